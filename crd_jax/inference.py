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

from crd_jax.compile import persistent_jit
from crd_jax.data.preprocess import Placement, apply_normalize, normalize, normalize_params, padded_shape, place
from crd_jax.ops import spatial
from crd_jax.ops.spatial import resize, resize_field


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


def _normalisation(preprocessing: Mapping, mode: str) -> Tuple[str, Sequence[float]]:
    """The normalisation to apply (``mode = "model"``: the model's own) and its percentiles."""
    mode = preprocessing.get("normalize", "none") if mode == "model" else mode
    return mode, preprocessing.get("percentiles", [0.5, 99.5])


def normalize_inputs(preprocessing: Mapping, fixed: np.ndarray, moving: np.ndarray, mode: str = "model"):
    """Both images normalised as the model's training data were (``mode = "model"``) or by ``mode``."""
    mode, percentiles = _normalisation(preprocessing, mode)
    return normalize(fixed, mode, *percentiles), normalize(moving, mode, *percentiles), mode


def _on_canvas(grid, work, multiple: int, fixed: np.ndarray, moving: np.ndarray) -> Prepared:
    """Images already on the model's ``work`` grid, centred on the network's canvas as batches."""
    placement = place(work, padded_shape(work, multiple))
    as_input = lambda a: jnp.asarray(placement.apply(np.asarray(a, np.float32))[None, ..., None])  # noqa: E731
    return Prepared(as_input(moving), as_input(fixed), grid, work, placement)


def resample_image(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """:func:`crd_jax.data.preprocess.resample` with ``order=1`` (half-pixel centres, edges repeated), compiled:
    the same values to float32 rounding (tested), without scipy's import and single-threaded pass at full
    resolution on every ``crd-jax register``."""
    shape = tuple(int(s) for s in shape)
    if tuple(np.shape(volume)) == shape:
        return volume
    return np.asarray(_resample_linear(jnp.asarray(volume, jnp.float32), shape))


@persistent_jit(static_argnums=1)
def _resample_linear(volume, shape):
    return resize(volume[None, ..., None], shape)[0, ..., 0]


def prepare(preprocessing: Mapping, multiple: int, fixed: np.ndarray, moving: np.ndarray) -> Prepared:
    """Already-normalised ``fixed``/``moving`` (same shape) -> network input on the model's canvas."""
    grid = tuple(fixed.shape)
    work = tuple(preprocessing.get("resample_shape") or ()) or grid
    if work != grid:
        fixed, moving = resample_image(fixed, work), resample_image(moving, work)
    return _on_canvas(grid, work, multiple, fixed, moving)


def prepare_raw(preprocessing: Mapping, multiple: int, fixed: np.ndarray, moving: np.ndarray, mode: str = "model"):
    """:func:`normalize_inputs` then :func:`prepare`, with the work at full resolution reduced to what it
    must be: the normalisation's statistics are taken on the full images, the images are resampled onto
    the model's grid as they are, and the (affine) normalisation is applied to the small ones. Returns
    ``(prepared, mode)``."""
    mode, percentiles = _normalisation(preprocessing, mode)
    params = [normalize_params(a, mode, *percentiles) for a in (fixed, moving)]
    grid = tuple(fixed.shape)
    work = tuple(preprocessing.get("resample_shape") or ()) or grid
    small = [a if work == grid else resample_image(a, work) for a in (fixed, moving)]
    f_in, m_in = (apply_normalize(a, q) for a, q in zip(small, params))
    return _on_canvas(grid, work, multiple, f_in, m_in), mode


@functools.lru_cache(maxsize=16)
def predictor(model):
    """The model's jitted ``(params, moving, fixed) -> disp`` (one per model object; with
    :func:`crd_jax.compile.cache_executables` on, its program is kept on disk, keyed by the model's repr)."""
    return persistent_jit(lambda p, m, f: model.apply(p, m, f).disp, context=repr(model))


def predict(model, params, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    return predictor(model)(params, moving, fixed)


def map_back(prepared: Prepared, disp_canvas) -> np.ndarray:
    """A ``(*canvas, ndim)`` (or batched) field on the canvas -> ``(*grid, ndim)`` on the caller's grid."""
    return np.array(map_back_device(prepared, disp_canvas))


def map_back_device(prepared: Prepared, disp_canvas) -> jax.Array:
    """:func:`map_back` as a JAX array: cropped, resampled and rescaled in one compiled program, so that
    the full-size field exists once, on the device (``np.asarray`` of it is a view on CPU)."""
    disp = jnp.asarray(disp_canvas, jnp.float32)
    src, dst = prepared.placement._windows()
    windows = tuple((d.start, d.stop, s.start, n - s.stop) for s, d, n in zip(src, dst, prepared.placement.source_shape))
    return _map_back(disp, windows, tuple(prepared.work), tuple(prepared.grid))


@persistent_jit(static_argnums=(1, 2, 3))
def _map_back(disp, windows, work, grid):
    disp = disp[0] if disp.ndim == len(grid) + 2 else disp
    inner = disp[tuple(slice(a, b) for a, b, _, _ in windows)]
    pad = [(before, after) for _, _, before, after in windows] + [(0, 0)]
    restored = jnp.pad(inner, pad, mode="edge")  # voxels cropped away take the nearest canvas value
    if work == grid:
        return restored
    return resize_field(restored[None], grid)[0]


def count_folds(disp) -> int:
    """Voxels with det J <= 0 of :func:`jacobian_determinant`, without keeping the map."""
    disp = jnp.asarray(disp, jnp.float32)
    return int(_jacobian_slabs(disp, _slabs(disp.shape[:-1]), True))


def jacobian_determinant(disp) -> np.ndarray:
    """:func:`crd_jax.metrics.jacobian_determinant` (central differences, one-sided at the border) in
    float32, compiled and computed in slabs of the first axis: what ``crd-jax register`` reports at full
    size, several times faster than the float64 version and with a fraction of its memory."""
    disp = jnp.asarray(disp, jnp.float32)
    return np.asarray(_jacobian_slabs(disp, _slabs(disp.shape[:-1]), False))


@persistent_jit(static_argnames=("slabs", "count"))
def _jacobian_slabs(disp, slabs, count):
    """det J in ``slabs`` slabs of the first axis; with ``count``, only the number of voxels with det <= 0."""
    from crd_jax.metrics import _det

    ndim, n = disp.shape[-1], disp.shape[0]
    size = -(-n // slabs)
    spread = jnp.ones((n,), disp.dtype).at[0].set(2.0).at[n - 1].set(2.0) if n > 1 else jnp.zeros((1,), disp.dtype)

    def slab(start):
        rows = jnp.clip(start - 1 + jnp.arange(size + 2), 0, n - 1)
        u = jnp.take(disp, rows, axis=0)  # the slab and its neighbours (edge rows repeated)
        # odd reflection continues each component linearly past the border (u[-1] = 2 u[0] - u[1]), so the
        # central difference there is the one-sided one, np.gradient's edges
        rest = [(0, 0)] + [(1, 1)] * (ndim - 1) + [(0, 0)]
        u = jnp.pad(u, rest, mode="reflect", reflect_type="odd") if ndim > 1 else u
        grads = []
        for j in range(ndim):
            d = 0.5 * (jax.lax.slice_in_dim(u, 2, None, axis=j) - jax.lax.slice_in_dim(u, 0, u.shape[j] - 2, axis=j))
            d = d[tuple(slice(1, -1) if a != j else slice(None) for a in range(ndim))]
            if j == 0:  # a repeated edge row halves the one-sided difference: undo it at the volume's ends
                row = jnp.take(spread, jnp.clip(start + jnp.arange(size), 0, n - 1))
                d = d * row.reshape((size,) + (1,) * ndim)
            grads.append(d)
        det = _det([[grads[j][..., i] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)])
        if count:  # rows past the end (the last slab's padding) do not count
            inside = (start + jnp.arange(size) < n).reshape((size,) + (1,) * (ndim - 1))
            return jnp.sum((det <= 0) & inside)
        return det

    out = jax.lax.map(slab, jnp.arange(slabs) * size)
    if count:
        return jnp.sum(out)
    return out.reshape(size * slabs, *out.shape[2:])[:n]


SLAB_VOXELS = 1 << 18  # output voxels warped at a time: bounds the gather's temporaries at full resolution


def _slabs(shape) -> int:
    """How many slabs along the first axis keep each near :data:`SLAB_VOXELS` output voxels."""
    return max(1, min(int(shape[0]), int(np.prod(shape)) // SLAB_VOXELS))


@persistent_jit(static_argnames=("order", "slabs", "dtype"))
def _warp_slabs(image, disp, order, slabs, dtype="float32"):
    """``image (*in)`` sampled at ``x + disp(x)`` for every voxel of ``disp (*out, d)``, ``slabs`` slabs of
    the first axis one after another (``lax.map``), edge voxels repeated outside (as :func:`warp`)."""
    from jax.scipy import ndimage

    n, ndim = disp.shape[0], disp.shape[-1]
    size = -(-n // slabs)
    rest = [jnp.arange(k, dtype=disp.dtype) for k in disp.shape[1:-1]]

    def slab(start):
        rows = jnp.clip(start + jnp.arange(size), 0, n - 1)  # the last slab repeats the last row (dropped below)
        field = jnp.take(disp, rows, axis=0)  # no padded copy of the whole field
        grid = jnp.meshgrid(*([rows.astype(disp.dtype)] + rest), indexing="ij")
        coords = [grid[k] + field[..., k] for k in range(ndim)]
        return ndimage.map_coordinates(image, coords, order=order, mode="nearest").astype(dtype)

    out = jax.lax.map(slab, jnp.arange(slabs) * size)
    return out.reshape(size * slabs, *out.shape[2:])[:n]


_sample_whole = persistent_jit(spatial.sample_volume, static_argnames=("order",))


def _sample(image, disp, order: int, dtype: str = "float32"):
    """The native kernel on the whole volume where it runs (one pass, no temporaries), else XLA's gathers in
    slabs of the output (their index arrays would not fit at once)."""
    if spatial.sampled_natively(image.dtype, disp.shape[-1]):
        return _sample_whole(image, disp, order=order).astype(dtype)
    return _warp_slabs(image, disp, order, _slabs(disp.shape[:-1]), dtype)


def warp_image(image: np.ndarray, disp, order: int = 1) -> np.ndarray:
    """``(*grid)`` image warped by a ``(*grid, ndim)`` field (linear), float32. ``disp``: numpy or a JAX
    array (not copied)."""
    image = jnp.asarray(image, jnp.float32)
    return np.asarray(_sample(image, jnp.asarray(disp, jnp.float32), order))


def warp_labels(labels: np.ndarray, disp) -> np.ndarray:
    """``(*grid)`` integer labels warped by nearest neighbour, in the labels' own integer type (64-bit maps
    as int32)."""
    labels = np.asarray(labels)
    dtype = labels.dtype if labels.dtype.itemsize <= 4 else np.dtype(np.int32)
    # the integer map goes in as it is (no float32 copy on the host): nearest-neighbour sampling only selects
    out = _sample(jnp.asarray(labels.astype(dtype, copy=False)), jnp.asarray(disp, jnp.float32), 0, dtype.name)
    return np.asarray(out)


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
def _instance_optimiser(model, learning_rate: float, reg_weight: float, window: int):
    """Three compiled programs: ``begin(params, m, f) -> (w, state, loss)`` (the network's field on its own
    grid), ``run(w, state, m, f, n) -> (w, state)`` (``n`` Adam steps, ``n`` a traced count: one program for
    every chunk) and ``end(w, m, f) -> (disp, loss)``."""
    import optax

    from crd_jax.ops.spatial import upsample_field
    from crd_jax.losses import registration_loss

    opt = optax.adam(learning_rate)

    def factor_of(m, w):
        return m.shape[1] // w.shape[1]

    def loss(w, m, f):
        factor = factor_of(m, w)
        disp = upsample_field(w, factor) if factor > 1 else w
        return registration_loss(m, f, disp, reg_weight, window)[0]

    def begin(params, m, f):
        out = model.apply(params, m, f)
        low = jax.lax.stop_gradient(out.disp if out.disp_low is None else out.disp_low)
        return low, opt.init(low), loss(low, m, f)

    def run(w, state, m, f, n):
        def body(_, carry):
            w, state = carry
            grads = jax.grad(loss)(w, m, f)
            updates, state = opt.update(grads, state, w)
            return optax.apply_updates(w, updates), state

        return jax.lax.fori_loop(0, n, body, (w, state))

    def end(w, m, f):
        factor = factor_of(m, w)
        return (upsample_field(w, factor) if factor > 1 else w), loss(w, m, f)

    return jax.jit(begin), jax.jit(run), jax.jit(end)


IO_CHUNK = 10  # Adam steps per compiled call: Ctrl-C (and SIGTERM) end instance optimisation within a chunk


def instance_optimise(model, params, prepared: Prepared, steps: int, learning_rate: float = 0.05,
                      reg_weight: float = 1.0, window: int = 9):
    """Fine-tunes the predicted field for this pair (``steps`` of Adam on eq. 3, NCC + lambda * grad),
    starting from the network's prediction. The free variable is the field on the network's own grid
    (``phi^L`` for a low-resolution model), so a step costs a warp at the canvas and no network pass.
    The steps run in chunks of :data:`IO_CHUNK`, each waited for, so that Ctrl-C stops the optimisation
    between two chunks rather than after the last step. Returns ``(disp on the canvas, loss before, loss after)``."""
    begin, run, end = _instance_optimiser(model, float(learning_rate), float(reg_weight), int(window))
    w, state, before = begin(params, prepared.moving, prepared.fixed)
    done = 0
    while done < int(steps):
        n = min(IO_CHUNK, int(steps) - done)
        w, state = run(w, state, prepared.moving, prepared.fixed, jnp.int32(n))
        jax.block_until_ready(w)  # back in Python between chunks: a pending KeyboardInterrupt is raised here
        done += n
    disp, after = end(w, prepared.moving, prepared.fixed)
    return disp, float(before), float(after)
