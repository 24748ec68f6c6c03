"""ITK transform files: the composite ``.h5`` that ``register --disp-format itk`` writes, and any transform file
SimpleITK reads (``.h5``, ``.tfm``, ``.txt``, ANTs' ``.mat``) as maps of world points, through SimpleITK.

Conventions (ITK's, which ANTs and SimpleITK share): physical points are millimetres in the LPS frame (a NIfTI
RAS point with x and y negated); a transform maps a point of the fixed (reference) image to the point of the
moving image sampled there; a composite transform applies its components last-first, so the composite
``[affine, displacement field]`` sends a fixed point through the displacement field, then through the affine,
as ``antsRegistration``'s ``Composite.h5`` does.

crd-jax's registration is that composite: its displacement ``u`` (fixed grid, voxels, pull-back) already holds
the affine pre-alignment ``W`` (fixed world -> moving world, RAS) after the deformable field, so the total map
is ``T(p) = A (i + u(i))`` at the fixed voxel ``i = A^-1 p``. :func:`composite_transform` splits it without
interpolation: at each fixed voxel the deformable field's point is ``W^-1 T(p)`` (so ``W`` after it gives
``T`` exactly), and the field is sampled by ITK at the same voxel centres it is stored at.

Inside SimpleITK's field transform a point within half a voxel of the grid is interpolated linearly (edge
values repeated); farther out the displacement is zero. :class:`FieldMap` reproduces that rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import numpy as np

from crd_jax.errors import InputError

if TYPE_CHECKING:
    import os
    import types

    import SimpleITK as sitk

    from crd_jax.data.io import PathLike

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, for points and (as FLIP @ M @ FLIP) for 4x4 maps
EXTRA_HINT = "install SimpleITK (pip install 'crd-jax[itk]')"
#: file names SimpleITK reads as transforms (ITK's HDF5, text and MATLAB formats; ANTs writes .mat and .h5)
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".hdf", ".tfm", ".txt", ".mat", ".xfm")


def simpleitk(source: Union[str, os.PathLike], purpose: str) -> types.ModuleType:
    """SimpleITK, or a one-line :class:`InputError` naming ``source``, what needs it and the extra to install."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(source, f"{purpose} needs SimpleITK, which is not installed: {EXTRA_HINT}") from None
    return sitk


def lps_geometry(affine: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """``(origin, spacing, direction)`` of an ITK image on the grid of a RAS voxel -> world ``affine`` (4x4)."""
    lps = FLIP @ np.asarray(affine, np.float64)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    return tuple(float(v) for v in lps[:3, 3]), tuple(float(s) for s in spacing), tuple(float(v) for v in direction.ravel())


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The RAS voxel -> world 4x4 affine of an ITK image's index grid (index ``(i, j, k)`` = array ``[i, j, k]``
    of :func:`array_of`)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), np.float64).reshape(dim, dim)
    out = np.eye(4)
    out[:dim, :dim] = direction * np.asarray(image.GetSpacing(), np.float64)
    out[:dim, 3] = image.GetOrigin()
    return FLIP @ out


def array_of(image: sitk.Image) -> np.ndarray:
    """An ITK image's voxels in index order ``(i, j, k[, component])`` (SimpleITK's arrays are ``k, j, i``)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    return np.transpose(arr, tuple(range(spatial - 1, -1, -1)) + tuple(range(spatial, arr.ndim)))


def deformable_part(disp: np.ndarray, fixed_affine: np.ndarray, world: Optional[np.ndarray]) -> np.ndarray:
    """The displacement (mm, LPS, ``(X, Y, Z, 3)`` float64) that, followed by the world map ``world`` (RAS 4x4,
    fixed -> moving; ``None``: identity), sends every fixed voxel centre where ``disp`` (voxels) sends it."""
    affine = np.asarray(fixed_affine, np.float64)
    shape = disp.shape[:-1]
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    start = grid @ affine[:3, :3].T + affine[:3, 3]  # each voxel centre in the world (RAS)
    end = (grid + disp) @ affine[:3, :3].T + affine[:3, 3]  # where the registration samples the moving image
    del grid
    if world is not None:
        back = np.linalg.inv(np.asarray(world, np.float64))
        end = end @ back[:3, :3].T + back[:3, 3]
    end -= start
    end[..., :2] *= -1.0  # RAS -> LPS
    return end


def composite_transform(
    disp: np.ndarray, fixed_affine: np.ndarray, world: Optional[np.ndarray] = None
) -> sitk.CompositeTransform:
    """A SimpleITK ``CompositeTransform`` ``[affine, displacement field]`` equal to a crd-jax registration:
    ``disp`` (the fixed grid's voxels, the affine already composed in, as ``register`` writes it) and its
    affine pre-alignment ``world`` (RAS fixed world -> moving world; ``None``: identity)."""
    sitk = simpleitk("--disp-format itk", "writing an ITK composite transform")
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"an ITK composite holds a 3-D field (X, Y, Z, 3), got {disp.shape}")
    field = deformable_part(disp, fixed_affine, world)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(field, (2, 1, 0, 3))), isVector=True)
    del field
    origin, spacing, direction = lps_geometry(fixed_affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    linear = sitk.AffineTransform(3)
    if world is not None:
        lps = FLIP @ np.asarray(world, np.float64) @ FLIP
        linear.SetMatrix(tuple(float(v) for v in lps[:3, :3].ravel()))
        linear.SetTranslation(tuple(float(v) for v in lps[:3, 3]))
    return sitk.CompositeTransform([linear, sitk.DisplacementFieldTransform(image)])


def write_composite(path: PathLike, disp: np.ndarray, fixed_affine: np.ndarray, world: Optional[np.ndarray] = None) -> None:
    """:func:`composite_transform` written to ``path`` (``.h5``: ITK's HDF5 transform file, float64, as
    ``antsRegistration`` writes it), atomically."""
    from crd_jax.data.io import atomic_path

    sitk = simpleitk(path, "writing an ITK composite transform")
    transform = composite_transform(disp, fixed_affine, world)
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix: ITK picks its writer by it
        sitk.WriteTransform(transform, tmp)


# --- reading: transforms as maps of world points (RAS, mm; fixed -> moving) ---------------------------------


class AffineMap:
    """``p -> M p`` for a RAS 4x4 ``matrix``."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = np.asarray(matrix, np.float64)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        if np.array_equal(self.matrix, np.eye(4)):  # a composite without an affine step holds the identity
            return points
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3]


class FieldMap:
    """``p -> p + d(p)`` for a displacement ``field`` (``(X, Y, Z, 3)``, mm, RAS) on a grid with RAS affine
    ``grid_affine``, interpolated linearly. ``outside``: ``"edge"`` continues the edge values everywhere (what
    crd-jax's own fields do, :func:`crd_jax.transforms.apply_to_points`); ``"zero"`` is ITK's rule (linear with
    edge values within half a voxel of the grid, no displacement beyond)."""

    def __init__(self, field: np.ndarray, grid_affine: np.ndarray, outside: str = "edge"):
        field = np.asarray(field)
        self.shape = tuple(field.shape[:3])
        self.components = [np.ascontiguousarray(field[..., c]) for c in range(3)]  # scipy copies strided inputs
        self.grid_affine = np.asarray(grid_affine, np.float64)
        self.to_voxel = np.linalg.inv(self.grid_affine)
        self.outside = outside

    def on_grid(self, shape: Sequence[int], affine: np.ndarray) -> bool:
        """Whether the field is stored on this grid (its values there need no interpolation)."""
        return tuple(shape) == self.shape and np.allclose(affine, self.grid_affine, atol=1e-6)

    def at_voxels(self) -> np.ndarray:
        """``p + d(p)`` for every voxel centre of the field's own grid, ``(X * Y * Z, 3)``: the stored values."""
        a = self.grid_affine
        world = np.empty((*self.shape, 3))
        world[:] = a[:3, 3]
        for axis, n in enumerate(self.shape):  # separable: one broadcast add per axis, no (N, 3) @ (3, 3)
            steps = np.arange(n, dtype=np.float64)[:, None] * a[:3, axis]
            world += steps.reshape([n if k == axis else 1 for k in range(3)] + [3])
        for c, component in enumerate(self.components):
            world[..., c] += component
        return world.reshape(-1, 3)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

        vox = points @ self.to_voxel[:3, :3].T + self.to_voxel[:3, 3]
        coords = np.ascontiguousarray(vox.T)
        d = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in self.components], -1)
        if self.outside == "zero":
            inside = np.all((vox >= -0.5) & (vox < np.asarray(self.shape) - 0.5), axis=1)
            d[~inside] = 0.0
        return points + d


class SitkMap:
    """Any other SimpleITK transform (B-splines, ...), point by point (slow for a whole grid)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, points: np.ndarray) -> np.ndarray:
        lps = points * np.array([-1.0, -1.0, 1.0])
        out = np.array([self.transform.TransformPoint(tuple(float(v) for v in p)) for p in lps], np.float64)
        return out.reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])


def _linear_matrix(transform) -> np.ndarray:
    """The RAS 4x4 matrix of a linear SimpleITK transform (read off the images of the origin and unit points)."""
    zero = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), np.float64)
    lps = np.eye(4)
    for j in range(3):
        e = [0.0, 0.0, 0.0]
        e[j] = 1.0
        lps[:3, j] = np.asarray(transform.TransformPoint(tuple(e)), np.float64) - zero
    lps[:3, 3] = zero
    return FLIP @ lps @ FLIP


def _maps_of(transform, sitk) -> list:
    """A SimpleITK transform as point maps in ANTs order (the last applied first), composites flattened."""
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        out = []
        for n in range(transform.GetNumberOfTransforms()):
            out += _maps_of(transform.GetNthTransform(n), sitk)
        return out
    if transform.GetDimension() != 3:
        raise ValueError(f"a {transform.GetDimension()}-D {transform.GetName()} (crd-jax applies 3-D transforms)")
    if transform.IsLinear():
        return [AffineMap(_linear_matrix(transform))]
    if isinstance(transform, sitk.DisplacementFieldTransform):
        image = transform.GetDisplacementField()
        field = array_of(image).astype(np.float64)
        field[..., :2] *= -1.0  # LPS -> RAS vectors
        return [FieldMap(field, ras_affine(image), outside="zero")]
    return [SitkMap(transform)]


def read_transform(path: PathLike) -> List:
    """An ITK transform file (anything SimpleITK's ``ReadTransform`` reads) as point maps in ANTs order; any
    problem is a one-line :class:`InputError` naming the file."""
    from crd_jax.data.io import check_input_file

    check_input_file(path, "a transform file")
    sitk = simpleitk(path, "reading an ITK transform file")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        first = next((l.strip() for l in str(exc).splitlines() if l.strip() and "sitk::ERROR" in l), "")
        raise InputError(
            path, "not a transform file SimpleITK reads" + (f" ({first.split('sitk::ERROR:')[-1].strip()})" if first else "")
        ) from None
    try:
        return _maps_of(transform, sitk)
    except ValueError as exc:
        raise InputError(path, f"holds {exc}") from None


def apply_maps(maps: Sequence, points: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """World points (``(N, 3)``, RAS mm, the fixed image's) through point maps in ANTs order: the last listed
    is applied first, as ``antsApplyTransforms -t A -t B`` applies B, then A. Chunks bound the temporaries."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    out = np.empty_like(points)
    for start in range(0, len(points), chunk):
        p = points[start : start + chunk]
        for m in reversed(list(maps)):
            p = m(p)
        out[start : start + chunk] = p
    return out


def displacement_on_grid(maps: Sequence, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """The chain ``maps`` as a crd-jax displacement on a grid (``shape``, RAS ``affine``): ``(*shape, 3)`` voxels
    of that grid, float32, pull-back (what :mod:`crd_jax.transforms` applies)."""
    affine = np.asarray(affine, np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    maps = list(maps)
    if maps and isinstance(maps[-1], FieldMap) and maps[-1].on_grid(shape, affine):
        # the first map applied is a field stored on this grid (a registration's composite.h5 on its fixed
        # image): its values are read, not interpolated
        world = apply_maps(maps[:-1], maps[-1].at_voxels())
    else:
        world = apply_maps(maps, grid @ affine[:3, :3].T + affine[:3, 3])
    inv = np.linalg.inv(affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    return (vox - grid).reshape(*shape, 3).astype(np.float32)
