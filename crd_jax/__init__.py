"""crd-jax: Cross-Resolution Distillation (Hu, Zhou, Xiong, Wu, IEEE TCSVT 2022) in JAX/Flax.

Fast, low-memory deformable registration of 3-D medical images: a low-resolution registration network
trained under a feature-shifted teacher built from a high/low-resolution pair of the same network.
"""

from crd_jax import losses, metrics
from crd_jax.api import fit_pair, register
from crd_jax.models import Registrar, VoxelMorph
from crd_jax.ops import spatial

__version__ = "0.1.0"

__all__ = ["losses", "metrics", "spatial", "Registrar", "VoxelMorph", "fit_pair", "register", "__version__"]
