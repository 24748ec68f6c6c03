"""The model's space: its orientation, its voxel size, and the one resampler onto its grid.

A model records the orientation (axis codes, e.g. ``LPS``) and voxel size of the data it was trained on, and
the grid its network sees. :func:`to_model_space` reorients a volume to the model's orientation (a
permutation and flips of the array axes, no resampling: nibabel's orientation tools), :func:`model_work_shape`
gives the shape that samples the volume's field of view at the model's voxel size, and :func:`resample_linear`
brings an image onto that grid. :func:`field_to_original` maps a displacement computed in the reoriented grid
back onto the original one (array axes and vector components alike, on the device). :func:`onto_grid` brings a
volume onto another volume's grid through both affines (a moving image on a fixed image's grid).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from crd_jax.data.io import Volume

if TYPE_CHECKING:
    import jax


def axis_codes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def to_model_space(volume: Volume, codes: str) -> Tuple[Volume, np.ndarray]:
    """``(reoriented volume, transform)``: the volume's axes permuted and flipped so that its orientation is
    ``codes``; the world positions of all voxels are unchanged (the affine follows)."""
    start = ornt.io_orientation(volume.affine)
    end = ornt.axcodes2ornt(tuple(codes))
    transform = ornt.ornt_transform(start, end)
    data = ornt.apply_orientation(volume.data, transform)
    affine = volume.affine @ ornt.inv_ornt_aff(transform, volume.data.shape)
    return Volume(data, affine, None, volume.path), transform  # a view: flips and transposes copy nothing


def _component_plan(transform: np.ndarray, original_shape: Sequence[int]):
    """``(plan, undo)``: component ``i`` of a field on the original grid is ``sign * component j`` of the
    field on the reoriented grid, ``plan[i] = (j, sign)`` (the orientation matrix is a signed permutation);
    ``undo`` maps the reoriented grid back onto the original one (``apply_orientation`` semantics)."""
    m = ornt.inv_ornt_aff(transform, tuple(original_shape))[:3, :3]
    plan = []
    for row in m:
        j = int(np.argmax(np.abs(row)))
        plan.append((j, float(np.sign(row[j]))))
    return tuple(plan), _inverse_transform(transform)


def field_to_original(disp: jax.Array, transform: np.ndarray, original_shape: Sequence[int]) -> jax.Array:
    """A ``(*reoriented, 3)`` voxel displacement (a JAX array) -> ``(*original, 3)`` in the original voxels,
    compiled, with no host copy of the full-size field."""
    import jax.numpy as jnp

    plan, undo = _component_plan(transform, original_shape)
    flips = tuple(int(a) for a, f in enumerate(undo[:, 1]) if f == -1)
    order = tuple(int(a) for a in np.argsort(undo[:, 0]))
    return _reorient_jit()(jnp.asarray(disp, jnp.float32), plan, flips, order)


def _reorient_field(disp, plan, flips, order):
    import jax.numpy as jnp

    d = jnp.flip(disp, axis=flips) if flips else disp
    d = jnp.transpose(d, order + (d.ndim - 1,))
    return jnp.stack([sign * d[..., j] for j, sign in plan], axis=-1)


@functools.lru_cache(maxsize=None)
def _reorient_jit():
    from crd_jax.compile import persistent_jit  # the geometry itself does not need JAX

    return persistent_jit(_reorient_field, static_argnums=(1, 2, 3))


def _inverse_transform(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform`` (``apply_orientation`` semantics)."""
    inverse = np.zeros_like(transform)
    for in_axis, (out_axis, flip) in enumerate(transform):
        inverse[int(out_axis)] = [in_axis, flip]
    return inverse


def model_voxel_size(geometry: Mapping, preprocessing: Mapping) -> Tuple[float, ...]:
    """The voxel size (mm) of the grid the network saw in training."""
    spacing = np.asarray(geometry["spacing"], np.float64)
    stored = np.asarray(geometry["stored_shape"], np.float64)
    resample = preprocessing.get("resample_shape") or []
    if len(resample):
        spacing = spacing * stored / np.asarray(resample, np.float64)
    return tuple(float(s) for s in spacing)


def model_work_shape(volume: Volume, voxel: Sequence[float]) -> Tuple[int, ...]:
    """The shape that covers the volume's field of view at the model's voxel size."""
    fov = np.asarray(volume.data.shape) * np.asarray(volume.spacing)
    return tuple(int(max(1, round(f / v))) for f, v in zip(fov, voxel))


def geometry_of(volume: Optional[Volume]) -> Optional[dict]:
    """What a model records of its training data's geometry (``None`` for data without an affine)."""
    if volume is None or volume.data.ndim != 3:
        return None
    return {
        "orientation": axis_codes(volume.affine),
        "spacing": [round(s, 6) for s in volume.spacing],
        "stored_shape": list(volume.data.shape),
    }


def onto_grid(moving: Volume, fixed: Volume, order: int) -> np.ndarray:
    """Samples ``moving`` at the world position of every voxel of ``fixed`` (affines of both files)."""
    ndim = fixed.data.ndim
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in fixed.data.shape], indexing="ij"), -1)
    to_moving = np.linalg.inv(moving.affine) @ fixed.affine  # fixed voxel -> world -> moving voxel
    coords = np.einsum("ij,...j->...i", to_moving[:ndim, :ndim], grid) + to_moving[:ndim, 3]
    from scipy import ndimage  # imported here: scipy.ndimage costs ~0.25 s of every command's start

    out = ndimage.map_coordinates(moving.data, np.moveaxis(coords, -1, 0), order=order, mode="constant", cval=0.0)
    return out.astype(moving.data.dtype)


def same_grid(a: Volume, b: Volume, tol: float = 1e-4) -> bool:
    return a.data.shape == b.data.shape and np.allclose(a.affine, b.affine, atol=tol)


def world_box(volume: Volume) -> Tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` corners (mm) of the axis-aligned world box around the volume's voxels."""
    ndim = volume.data.ndim
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in volume.data.shape], indexing="ij")).reshape(ndim, -1)
    world = volume.affine[:ndim, :ndim] @ corners + volume.affine[:ndim, 3:4]
    return world.min(axis=1), world.max(axis=1)


def world_gap(a: Volume, b: Volume) -> float:
    """Distance (mm) between the world boxes of two volumes; 0 when they overlap."""
    (alo, ahi), (blo, bhi) = world_box(a), world_box(b)
    separation = np.maximum(0.0, np.maximum(alo, blo) - np.minimum(ahi, bhi))
    return float(np.linalg.norm(separation))


def resample_linear(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """An image resampled linearly to ``shape`` (half-pixel centres, edges repeated), compiled: what
    registration resamples onto the model's grid with. It equals the training data's resampling
    (:func:`crd_jax.data.preprocess.resample`, ``scipy.ndimage.zoom`` order 1) to float32 rounding (tested),
    without scipy's import and single-threaded pass at full resolution."""
    shape = tuple(int(s) for s in shape)
    if tuple(np.shape(volume)) == shape:
        return volume
    return np.asarray(_resample_jit()(volume, shape))


@functools.lru_cache(maxsize=None)
def _resample_jit():
    import jax.numpy as jnp

    from crd_jax.compile import persistent_jit
    from crd_jax.ops.spatial import resize

    def run(volume, shape):
        return resize(jnp.asarray(volume, jnp.float32)[None, ..., None], shape)[0, ..., 0]

    return persistent_jit(run, static_argnums=1)
