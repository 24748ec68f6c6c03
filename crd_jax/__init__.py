"""crd-jax: Cross-Resolution Distillation (Hu, Zhou, Xiong, Wu, IEEE TCSVT 2022) in JAX/Flax.

Fast, low-memory deformable registration of 3-D medical images: a low-resolution registration network
trained under a feature-shifted teacher built from a high/low-resolution pair of the same network.

The names below are imported on first use (PEP 562), so that ``crd-jax models`` or ``crd-jax --version``
do not pay for JAX, Flax and SciPy.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "losses": ("crd_jax.losses", None),
    "metrics": ("crd_jax.metrics", None),
    "spatial": ("crd_jax.ops.spatial", None),
    "fit_pair": ("crd_jax.api", "fit_pair"),
    "register": ("crd_jax.api", "register"),
    "Registrar": ("crd_jax.models", "Registrar"),
    "VoxelMorph": ("crd_jax.models", "VoxelMorph"),
}

__all__ = ["losses", "metrics", "spatial", "Registrar", "VoxelMorph", "fit_pair", "register", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'crd_jax' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = getattr(value, attr) if attr else value
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
