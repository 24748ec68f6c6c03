"""The one inference path: prepare -> predict -> map back, used by the Python API, ``crd-jax`` and the
evaluator.

* :func:`prepare` turns two arrays on a common grid into the network's input exactly as the model was
  trained (its ``preprocessing`` record: intensity normalisation, resampling onto its grid, centring on a
  canvas whose sides divide by ``2^(levels + k)``), and remembers how to undo it.
* :func:`predict` runs the model's one jitted predictor (cached per model object).
* :func:`map_back` returns the field on the caller's grid (canvas removed, resampled back, values in the
  caller's voxels); :func:`warp_image` / :func:`warp_labels` apply it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.data.preprocess import Placement, normalize, padded_shape, place, resample
from crd_jax.ops.spatial import resize_field, warp


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Network inputs ``(1, *canvas, 1)`` and the way back to the caller's grid."""

    moving: jax.Array
    fixed: jax.Array
    grid: Tuple[int, ...]  # the caller's grid
    work: Tuple[int, ...]  # the model's grid (resample_shape), or the caller's
    placement: Placement  # work -> canvas

    @property
    def notes(self):
        out = []
        if self.work != self.grid:
            out.append(f"network input resampled to {self.work} as in training")
        if self.placement.canvas_shape != self.work:
            out.append(f"padded {self.work} -> {self.placement.canvas_shape} for the network, result mapped back")
        return out


def canvas_multiple(spec: Mapping) -> int:
    """The side multiple a saved model needs: its record, and ``2^levels * n`` for a registrar."""
    pre = spec.get("preprocessing", {})
    multiple = int(pre.get("multiple", 32))
    if spec.get("kind") == "registrar":
        from crd_jax.models.build import levels, spec_architecture

        multiple = max(multiple, 2 ** levels(spec_architecture(spec)) * int(spec["factor"]))
    return multiple


def normalize_inputs(preprocessing: Mapping, fixed: np.ndarray, moving: np.ndarray, mode: str = "model"):
    """Both images normalised as the model's training data were (``mode = "model"``) or by ``mode``."""
    mode = preprocessing.get("normalize", "none") if mode == "model" else mode
    percentiles = preprocessing.get("percentiles", [0.5, 99.5])
    return normalize(fixed, mode, *percentiles), normalize(moving, mode, *percentiles), mode


def prepare(preprocessing: Mapping, multiple: int, fixed: np.ndarray, moving: np.ndarray) -> Prepared:
    """Already-normalised ``fixed``/``moving`` (same shape) -> network input on the model's canvas."""
    grid = tuple(fixed.shape)
    work = tuple(preprocessing.get("resample_shape") or ()) or grid
    if work != grid:
        fixed, moving = resample(fixed, work, 1), resample(moving, work, 1)
    placement = place(work, padded_shape(work, multiple))
    as_input = lambda a: jnp.asarray(placement.apply(np.asarray(a, np.float32)))[None, ..., None]  # noqa: E731
    return Prepared(as_input(moving), as_input(fixed), grid, work, placement)


@functools.lru_cache(maxsize=16)
def predictor(model):
    """The model's jitted ``(params, moving, fixed) -> disp`` (one per model object)."""
    return jax.jit(lambda p, m, f: model.apply(p, m, f).disp)


def predict(model, params, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    return predictor(model)(params, moving, fixed)


def map_back(prepared: Prepared, disp_canvas) -> np.ndarray:
    """A ``(*canvas, ndim)`` (or batched) field on the canvas -> ``(*grid, ndim)`` on the caller's grid."""
    disp = np.asarray(disp_canvas)
    disp = disp[0] if disp.ndim == len(prepared.grid) + 2 else disp
    disp = prepared.placement.restore(disp)
    if prepared.work != prepared.grid:
        disp = np.asarray(resize_field(jnp.asarray(disp)[None], prepared.grid)[0])
    return disp.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("order",))
def _warp(image, disp, order):
    return warp(image, disp, order=order)


def warp_image(image: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """``(*grid)`` image warped by a ``(*grid, ndim)`` field (linear)."""
    return np.asarray(_warp(jnp.asarray(image, jnp.float32)[None, ..., None], jnp.asarray(disp)[None], order))[0, ..., 0]


def warp_labels(labels: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """``(*grid)`` integer labels warped by nearest neighbour."""
    return np.asarray(_warp(jnp.asarray(labels, jnp.int32)[None, ..., None], jnp.asarray(disp)[None], 0))[0, ..., 0]


def register_arrays(model, params, preprocessing: Mapping, multiple: int, fixed: np.ndarray, moving: np.ndarray,
                    moving_seg: Optional[np.ndarray] = None, normalize_mode: str = "model"):
    """prepare -> predict -> map back -> warp, for arrays on one grid. Returns ``(result, prepared)``."""
    f_in, m_in, _ = normalize_inputs(preprocessing, fixed, moving, normalize_mode)
    prepared = prepare(preprocessing, multiple, f_in, m_in)
    disp = map_back(prepared, predict(model, params, prepared.moving, prepared.fixed))
    result = {"disp": disp, "warped": warp_image(moving, disp)}
    if moving_seg is not None:
        result["warped_seg"] = warp_labels(moving_seg, disp)
    return result, prepared


@functools.lru_cache(maxsize=16)
def _instance_optimiser(model, steps: int, learning_rate: float, reg_weight: float, window: int):
    import optax

    from crd_jax.ops.spatial import upsample_field
    from crd_jax.losses import registration_loss

    opt = optax.adam(learning_rate)

    def run(params, m, f):
        out = model.apply(params, m, f)
        low = jax.lax.stop_gradient(out.disp if out.disp_low is None else out.disp_low)
        factor = m.shape[1] // low.shape[1]

        def loss(w):
            disp = upsample_field(w, factor) if factor > 1 else w
            return registration_loss(m, f, disp, reg_weight, window)[0]

        def body(_, carry):
            w, state = carry
            grads = jax.grad(loss)(w)
            updates, state = opt.update(grads, state, w)
            return optax.apply_updates(w, updates), state

        before = loss(low)
        w, _ = jax.lax.fori_loop(0, steps, body, (low, opt.init(low)))
        after = loss(w)
        return (upsample_field(w, factor) if factor > 1 else w), before, after

    return jax.jit(run)


def instance_optimise(model, params, prepared: Prepared, steps: int, learning_rate: float = 0.05,
                      reg_weight: float = 1.0, window: int = 9):
    """Fine-tunes the predicted field for this pair (``steps`` of Adam on eq. 3, NCC + lambda * grad),
    starting from the network's prediction. The free variable is the field on the network's own grid
    (``phi^L`` for a low-resolution model), so a step costs a warp at the canvas and no network pass.
    Returns ``(disp on the canvas, loss before, loss after)``."""
    disp, before, after = _instance_optimiser(model, int(steps), float(learning_rate), float(reg_weight), int(window))(
        params, prepared.moving, prepared.fixed)
    return disp, float(before), float(after)
