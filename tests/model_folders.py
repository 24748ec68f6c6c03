"""Small model folders for the command-line tests: the authors' VM layout at 1/2 resolution, random weights
or a constant output field."""

import jax
import jax.numpy as jnp

from crd_jax.interop import official
from crd_jax.model_io import save_model
from crd_jax.models.build import model_from_spec


def make_model_folder(path, side=32, normalize="minmax", bias=None, label="VM-L (test)", **preprocessing):
    """Saves a VM-L model folder; ``bias``: a constant field (low-resolution voxels; times 2 at full size)
    instead of random weights' near-zero output. Returns ``(path, params, spec)``."""
    arch = official.ARCHITECTURE | {"fusion": "paper", "teacher_align_corners": False}
    pre = {"normalize": normalize, "percentiles": [0.5, 99.5], "resample_shape": [], "multiple": 32, "ndim": 3, **preprocessing}
    spec = {"kind": "registrar", "factor": 2, "architecture": arch, "label": label, "stage": "test", "preprocessing": pre}
    model = model_from_spec(spec)
    x = jnp.zeros((1, side, side, side, 1))
    params = model.init(jax.random.PRNGKey(0), x, x)
    if bias is not None:
        params["flow"]["conv"]["kernel"] = jnp.zeros_like(params["flow"]["conv"]["kernel"])
        params["flow"]["conv"]["bias"] = jnp.asarray(bias, jnp.float32)
    save_model(path, params, spec)
    return path, params, spec
