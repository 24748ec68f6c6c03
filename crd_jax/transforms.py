"""Using a saved displacement: warp images, label maps and points with it; invert it; measure it.

A displacement ``u`` lives on the reference (fixed) grid, in its voxels: the reference voxel ``x``
corresponds to the world point ``A_f (x + u(x))`` of the moving image (a pull-back, as VoxelMorph, ANTs and
ITK store it). Images and label maps may sit on any grid: they are sampled at those world points through
their own affine, so a moving image need not share the reference's grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

INTERPOLATIONS = ("linear", "bspline", "nearest", "onehot")


def _voxel_grid(shape: Sequence[int]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)


def sample_coordinates(disp: np.ndarray, reference_affine: np.ndarray, image_affine: np.ndarray) -> np.ndarray:
    """``(ndim, *grid)`` voxel coordinates in the image for every reference voxel ``x``: ``x + u(x)`` taken
    to the world by the reference's affine and back by the image's."""
    ndim = disp.shape[-1]
    points = _voxel_grid(disp.shape[:-1]) + disp
    to_image = np.linalg.inv(image_affine) @ reference_affine
    coords = np.einsum("ij,...j->...i", to_image[:ndim, :ndim], points) + to_image[:ndim, ndim]
    return np.moveaxis(coords, -1, 0)


def apply_to_image(
    image: np.ndarray, image_affine: np.ndarray, disp: np.ndarray, reference_affine: np.ndarray, interpolation: str = "linear"
) -> np.ndarray:
    """An intensity image warped onto the reference grid (``linear``, cubic ``bspline`` or ``nearest``).
    Outside the image the edge values continue (border clamping, as ``crd-jax register``'s own outputs)."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    if interpolation not in ("linear", "bspline", "nearest"):
        raise ValueError(f"images take linear, bspline or nearest interpolation, got {interpolation!r}")
    order = {"linear": 1, "bspline": 3, "nearest": 0}[interpolation]
    coords = sample_coordinates(disp, reference_affine, image_affine)
    return ndimage.map_coordinates(np.asarray(image, np.float32), coords, order=order, mode="nearest")


def apply_to_labels(
    labels: np.ndarray, labels_affine: np.ndarray, disp: np.ndarray, reference_affine: np.ndarray, interpolation: str = "nearest"
) -> np.ndarray:
    """A label map warped onto the reference grid: ``nearest`` neighbour, or ``onehot``: each label's
    indicator interpolated linearly and the largest taken per voxel (smoother boundaries; background wins
    ties, so no label grows)."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    labels = np.asarray(labels)
    coords = sample_coordinates(disp, reference_affine, labels_affine)
    if interpolation == "nearest":
        return ndimage.map_coordinates(labels, coords, order=0, mode="nearest").astype(labels.dtype)
    if interpolation != "onehot":
        raise ValueError(f"label maps take nearest or onehot interpolation, got {interpolation!r}")
    best = ndimage.map_coordinates((labels == 0).astype(np.float32), coords, order=1, mode="nearest")
    out = np.zeros(disp.shape[:-1], labels.dtype)
    for value in np.unique(labels):
        if value == 0:
            continue
        p = ndimage.map_coordinates((labels == value).astype(np.float32), coords, order=1, mode="nearest")
        win = p > best
        out[win], best[win] = value, p[win]
    return out


def apply_to_points(points_world: np.ndarray, disp: np.ndarray, reference_affine: np.ndarray) -> np.ndarray:
    """World points of the reference (``(N, ndim)``, mm) -> their corresponding world points in the moving
    image, ``A_f (x + u(x))`` with ``u`` interpolated linearly at ``x = A_f^-1 p`` (landmarks, TRE)."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    points_world = np.atleast_2d(np.asarray(points_world, np.float64))
    ndim = disp.shape[-1]
    inv = np.linalg.inv(reference_affine)
    vox = points_world @ inv[:ndim, :ndim].T + inv[:ndim, ndim]
    u = np.stack([ndimage.map_coordinates(disp[..., i], vox.T, order=1, mode="nearest") for i in range(ndim)], -1)
    moved = vox + u
    return moved @ np.asarray(reference_affine)[:ndim, :ndim].T + np.asarray(reference_affine)[:ndim, ndim]


#: the coarse grid of :func:`invert_fast` has at most this many voxels per side
COARSE_SIDE = 96


def invert_fast(disp: np.ndarray, coarse_iterations: int = 50, fine_iterations: int = 12) -> np.ndarray:
    """:func:`invert`'s fixed point ``v <- -u(x + v)`` solved where it is cheap: on a grid at most
    :data:`COARSE_SIDE` voxels per side (the field resampled, values rescaled) to convergence, then brought to the
    field's grid and refined there by ``fine_iterations`` steps (each one linear sampling pass in XLA, float32).
    Registration fields are smooth upsamplings of a network's output, so the coarse solution is already close;
    the fine steps remove the resampling error. Same border handling as :func:`invert` (edge values)."""
    import jax.numpy as jnp

    shape = tuple(int(s) for s in np.shape(disp)[:-1])
    factor = max(1, int(np.ceil(max(shape) / COARSE_SIDE)))
    coarse = tuple(max(2, int(np.ceil(s / factor))) for s in shape)
    return np.asarray(_invert_jit(jnp.asarray(disp, jnp.float32)[None], coarse, int(coarse_iterations), int(fine_iterations))[0])


def _invert_impl(u, coarse, coarse_iterations, fine_iterations):
    import jax

    from crd_jax.ops.spatial import resize_field, warp

    shape = tuple(u.shape[1:-1])
    u_c = resize_field(u, coarse) if coarse != shape else u

    def step(field):
        return lambda _, v: -warp(field, v)

    v = jax.lax.fori_loop(0, coarse_iterations, step(u_c), -u_c)
    v = resize_field(v, shape) if coarse != shape else v
    return jax.lax.fori_loop(0, fine_iterations, step(u), v)


def _invert_jit(u, coarse, coarse_iterations, fine_iterations):
    import jax

    global _INVERT
    if _INVERT is None:
        _INVERT = jax.jit(_invert_impl, static_argnums=(1, 2, 3))
    return _INVERT(u, coarse, coarse_iterations, fine_iterations)


_INVERT = None


def invert(disp: np.ndarray, iterations: int = 50, tolerance: float = 1e-3) -> np.ndarray:
    """The inverse displacement ``v`` with ``x + v(x) + u(x + v(x)) = x`` by the fixed-point iteration
    ``v <- -u(x + v)`` (Chen et al. 2008), linear interpolation, border values outside. Converges where the
    field is invertible (``|grad u| < 1``); stops when the update is below ``tolerance`` voxels."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    disp = np.asarray(disp, np.float64)
    ndim = disp.shape[-1]
    grid = np.moveaxis(_voxel_grid(disp.shape[:-1]), -1, 0)
    v = -disp.copy()
    for _ in range(iterations):
        coords = grid + np.moveaxis(v, -1, 0)
        new = -np.stack([ndimage.map_coordinates(disp[..., i], coords, order=1, mode="nearest") for i in range(ndim)], -1)
        change = float(np.abs(new - v).max())
        v = new
        if change < tolerance:
            break
    return v.astype(np.float32)
