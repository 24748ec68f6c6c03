"""A small high-level API: register two arrays with a model, or fit a model to one pair."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crd_jax.losses import registration_loss
from crd_jax.models.registrar import Registrar
from crd_jax.registration.model import predict
from crd_jax.registration.warping import warp_image, warp_labels

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike
    from crd_jax.typing import Params


def as_batch(image: np.ndarray | jax.Array) -> jax.Array:
    """``(*spatial)`` -> ``(1, *spatial, 1)`` float32; arrays that already have batch and channel pass."""
    image = jnp.asarray(image, jnp.float32)
    if image.ndim in (2, 3):
        return image[None, ..., None]
    if image.ndim in (4, 5) and image.shape[0] == 1 and image.shape[-1] == 1:
        return image
    raise ValueError(f"expected a 2-D or 3-D image, got shape {image.shape}")


def register(
    model: Registrar,
    params: Params,
    moving: np.ndarray | jax.Array,
    fixed: np.ndarray | jax.Array,
    moving_seg: Optional[np.ndarray] = None,
) -> Dict[str, np.ndarray]:
    """Registers ``moving`` to ``fixed`` (``(*spatial)`` arrays). Returns numpy ``disp`` ``(*spatial, ndim)``,
    ``warped`` ``(*spatial)`` and, given ``moving_seg``, ``warped_seg`` (nearest neighbour)."""
    m, f = as_batch(moving), as_batch(fixed)
    disp = np.asarray(predict(model, params, m, f)[0])
    out = {"disp": disp, "warped": warp_image(np.asarray(m[0, ..., 0]), disp)}
    if moving_seg is not None:
        out["warped_seg"] = warp_labels(np.asarray(moving_seg), disp)
    return out


def fit_pair(
    model: Registrar,
    moving: np.ndarray | jax.Array,
    fixed: np.ndarray | jax.Array,
    steps: int = 200,
    learning_rate: float = 1e-3,
    reg_weight: float = 1.0,
    seed: int = 0,
    params: Optional[dict] = None,
) -> Params:
    """Optimises the network on a single pair with eq. 3 (instance-specific optimisation).

    Useful to try the models on two arrays without a training set; real use trains on many pairs
    (``train.py``).
    """
    m, f = as_batch(moving), as_batch(fixed)
    if params is None:
        params = model.init(jax.random.PRNGKey(seed), m, f)
    opt = optax.adam(learning_rate, b1=0.9, b2=0.99)
    state = opt.init(params)

    # The images are arguments, not closed-over constants: XLA would otherwise constant-fold the loss's
    # box sums over the fixed image at compile time (minutes for a 3-D volume).
    @jax.jit
    def step(params, state, m, f):
        def loss_fn(p):
            return registration_loss(m, f, model.apply(p, m, f).disp, reg_weight)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, _ = step(params, state, m, f)
    return params


def register_files(
    pairs: Iterable[Sequence[PathLike]],
    model: Optional[str] = None,
    normalize_mode: str = "model",
    io_steps: int = 0,
    affine: str = "",
    jacobian: bool = False,
) -> Iterator[Tuple[Sequence[PathLike], Dict[str, Any]]]:
    """Registers file pairs with one model, loaded and compiled once (what ``crd-jax register --pairs``
    does). ``pairs``: ``(fixed, moving)`` or ``(fixed, moving, moving_seg)`` paths; ``model``: a shipped
    model's name or a model folder (default: the default shipped model). Yields ``(pair, result)`` per pair,
    ``result`` as :func:`crd_jax.registration.pipeline.register_volumes` returns it (``disp``, ``warped``,
    ``folds``, ``warped_seg`` with labels, the volumes' geometry in ``fixed``), on the fixed image's grid."""
    from crd_jax import pretrained
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, register_volumes

    loaded = load(pretrained.resolve(model))
    for pair in pairs:
        fixed_path, moving_path, seg_path = (tuple(pair) + (None,))[:3]
        fixed, moving, moving_seg, _ = load_pair(loaded, str(fixed_path), str(moving_path), seg_path and str(seg_path))
        result, notes = register_volumes(loaded, fixed, moving, moving_seg, normalize_mode, io_steps, affine, jacobian)
        yield pair, dict(result, fixed=fixed, notes=notes)
