"""The field applied on the device: images and label maps warped (slab by slab at full resolution, or by
the native kernel in one pass), folds counted and det J mapped, in float32."""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.compile import persistent_jit
from crd_jax.ops import spatial


def compact_labels(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(indices int32, values)`` with ``values[indices] == labels`` and label 0 at index 0 (background stays
    0 where a warp samples outside): label maps whose values do not fit in int32 are warped as indices, so
    every label survives exactly."""
    values = np.unique(labels)
    values = np.concatenate([np.zeros(1, values.dtype), values[values != 0]])
    order = np.argsort(values, kind="stable")
    indices = order[np.searchsorted(values[order], labels)].astype(np.int32)
    return indices, values


def count_folds(disp: np.ndarray | jax.Array) -> int:
    """Voxels with det J <= 0 of :func:`jacobian_determinant`, without keeping the map."""
    disp = jnp.asarray(disp, jnp.float32)
    return int(_jacobian_slabs(disp, _slabs(disp.shape[:-1]), True))


def jacobian_determinant(disp: np.ndarray | jax.Array) -> np.ndarray:
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


def warp_image(image: np.ndarray, disp: np.ndarray | jax.Array, order: int = 1) -> np.ndarray:
    """``(*grid)`` image warped by a ``(*grid, ndim)`` field (linear), float32. ``disp``: numpy or a JAX
    array (not copied)."""
    image = jnp.asarray(image, jnp.float32)
    return np.asarray(_sample(image, jnp.asarray(disp, jnp.float32), order))


def warp_labels(labels: np.ndarray, disp: np.ndarray | jax.Array) -> np.ndarray:
    """``(*grid)`` integer labels warped by nearest neighbour, in the labels' own integer type; maps whose
    values do not fit in int32 are warped as indices (:func:`compact_labels`), so every label survives exactly."""
    labels = np.asarray(labels)
    if labels.dtype.itemsize > 4:
        indices, values = compact_labels(labels)
        return values[warp_labels(indices, disp)]
    # the integer map goes in as it is (no float32 copy on the host): nearest-neighbour sampling only selects
    out = _sample(jnp.asarray(labels), jnp.asarray(disp, jnp.float32), 0, labels.dtype.name)
    return np.asarray(out)
