"""A chain of saved transforms, as ``crd-jax apply --transform A --transform B ...`` reads it.

Every transform maps a point of the fixed (reference) image to the point of the moving image sampled there
(ITK's and ANTs' convention; a crd-jax displacement is such a pull-back map, in voxels of the fixed grid). A
chain is listed in ANTs' order: the last one listed is applied first, as ``antsApplyTransforms -t A -t B``
sends a reference point through B, then through A. So ``composite.h5`` equals ``affine_itk.txt`` followed in
the list by the deformable field, and a registration of M to F (``M_to_F``) composed with one of F to R
(``F_to_R``) takes M onto R's grid as ``--reference R --transform M_to_F/disp.nii.gz --transform F_to_R/disp.nii.gz``
(R's point goes to F first, then to M).

Kinds, by file name: a displacement field (NIfTI: crd-jax's voxels ``(X, Y, Z, 3)`` or ITK's 5-D
``(X, Y, Z, 1, 3)`` millimetres LPS, each placed by its own affine; a Learn2Reg ``.npz``, on the reference's
grid; crd-jax's compact ``.npz``), an ITK transform file (``.h5``, ``.tfm``, ``.txt``, ``.mat``: affines,
composites, displacement fields, through SimpleITK) or crd-jax's ``affine.txt`` (a 4x4 RAS matrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from crd_jax.data.io import PathLike, Volume
from crd_jax.errors import InputError
from crd_jax.interop import itk
from crd_jax.interop.formats import read_displacement, voxel_to_physical

FIELD_KINDS = ("voxel", "itk", "learn2reg", "compact")


def _is_itk_text(path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"#Insight Transform File")


def read_ras_matrix(path: PathLike) -> np.ndarray:
    """crd-jax's ``affine.txt``: a 4x4 matrix (``#`` comments), RAS fixed world -> moving world."""
    try:
        matrix = np.loadtxt(path, comments="#", ndmin=2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"neither an ITK transform file nor a 4x4 matrix ({str(exc).splitlines()[0][:80]})") from None
    if matrix.shape != (4, 4):
        raise InputError(path, f"expected a 4x4 affine matrix (crd-jax's affine.txt), got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise InputError(path, "the affine matrix holds NaN/Inf values")
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise InputError(path, f"the affine matrix's last row must be 0 0 0 1, got {matrix[3].tolist()}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise InputError(path, "the affine matrix is singular")
    return matrix


def field_kind(path: PathLike, fmt: str = "auto") -> Optional[str]:
    """``voxel``, ``itk``, ``learn2reg`` or ``compact`` for a displacement file (``auto``: ITK's by a name
    ending ``_itk.nii[.gz]`` or a 5-D array, decided when read), ``None`` for any other transform file."""
    name = str(path).lower()
    if name.endswith(".npz"):
        if fmt != "auto":
            return fmt
        try:
            from crd_jax.registration import compact  # the compact format, where this crd-jax has it
        except ImportError:
            return "learn2reg"
        return "compact" if compact.is_compact(path) else "learn2reg"
    if name.endswith((".nii", ".nii.gz")):
        return fmt if fmt != "auto" else "itk" if name.endswith(("_itk.nii.gz", "_itk.nii")) else "auto"
    return None


def _nifti_field(path, fmt: str) -> itk.FieldMap:
    """A NIfTI displacement on its own grid (placed by its own affine) as a point map."""
    from crd_jax.data.io import _load_nifti_with_header

    try:
        img, _ = _load_nifti_with_header(Path(path))
        raw = np.asarray(img.dataobj, np.float64)
        affine = np.asarray(img.affine, np.float64)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable displacement ({type(exc).__name__}: {exc})") from None
    if fmt == "auto":  # ITK's 5-D layout (ANTs' *Warp.nii.gz), else crd-jax's voxels
        fmt = "itk" if raw.ndim == 5 else "voxel"
    if raw.ndim not in (4, 5) or raw.shape[-1] != 3 or (raw.ndim == 5 and raw.shape[3] != 1):
        want = "(X, Y, Z, 1, 3) millimetres LPS" if fmt == "itk" else "(X, Y, Z, 3) voxels"
        raise InputError(path, f"displacement of shape {raw.shape} is not a 3-D field {want} ({fmt} format)")
    bad = int((~np.isfinite(raw)).sum())
    if bad:
        raise InputError(path, f"displacement holds {bad} NaN/Inf values")
    raw = raw.reshape(*raw.shape[:3], 3)
    mm = raw * np.array([-1.0, -1.0, 1.0]) if fmt == "itk" else voxel_to_physical(raw, affine)
    return itk.FieldMap(mm, affine)


def read_one(path: PathLike, reference: Optional[Volume], fmt: str = "auto") -> list:
    """One transform file as point maps (RAS mm, fixed -> moving) in ANTs order."""
    from crd_jax.data.io import check_input_file

    check_input_file(path, "a transform file")
    kind = field_kind(path, fmt)
    if kind == "compact":
        from crd_jax.registration import compact

        field, affine = compact.expand(path)
        if np.shape(field)[-1] != 3:
            raise InputError(path, f"a {np.shape(field)[-1]}-D field; transform chains are 3-D")
        return [itk.FieldMap(voxel_to_physical(np.asarray(field, np.float64), affine), affine)]
    if kind == "learn2reg":
        if reference is None:
            raise InputError(path, "a Learn2Reg .npz has no geometry of its own: give --reference (its fixed image)")
        field = read_displacement(path, reference, "learn2reg")
        return [itk.FieldMap(voxel_to_physical(field.astype(np.float64), reference.affine), reference.affine)]
    if kind is not None:
        return [_nifti_field(path, kind)]
    if str(path).lower().endswith(".txt") and not _is_itk_text(path):
        return [itk.AffineMap(read_ras_matrix(path))]
    if str(path).lower().endswith(itk.TRANSFORM_SUFFIXES):
        return itk.read_transform(path)
    raise InputError(
        path,
        "unknown transform format (expected a displacement .nii/.nii.gz/.npz, an ITK transform "
        f"file {'/'.join(itk.TRANSFORM_SUFFIXES)}, or crd-jax's affine.txt)",
    )


def read_chain(paths: Sequence, reference: Optional[Volume], fmt: str = "auto") -> List:
    """Every file of a chain (ANTs order) as one list of point maps, in the same order."""
    maps: list = []
    for path in paths:
        maps += read_one(path, reference, fmt)
    return maps


def displacement_for(paths: Sequence, reference: Volume, fmt: str = "auto") -> np.ndarray:
    """The chain as a crd-jax displacement on the reference's grid (``(*shape, 3)`` voxels, float32).

    One NIfTI or Learn2Reg field alone is read as ``apply --disp`` always read it: stored on the reference's
    grid (another grid is refused: the field belongs to another fixed image), its values as saved. A compact
    field is expanded onto its own grid, used as it is when that is the reference's. Any other chain is
    evaluated point by point at the reference's voxel centres (float64) and turned into voxels of its grid."""
    if len(paths) == 1 and field_kind(paths[0], fmt) in ("voxel", "itk", "learn2reg", "auto"):
        return _plausible(read_displacement(paths[0], reference, fmt), reference, paths)
    if len(paths) == 1 and field_kind(paths[0], fmt) == "compact":
        from crd_jax.registration import compact
        from crd_jax.registration.space import same_grid

        field, affine = compact.expand(paths[0])
        if same_grid(Volume(np.broadcast_to(np.float32(0), np.shape(field)[:-1]), np.asarray(affine)), reference):
            return _plausible(np.asarray(field, np.float32), reference, paths)
    disp = itk.displacement_on_grid(read_chain(paths, reference, fmt), reference.data.shape, reference.affine)
    return _plausible(disp, reference, paths)


#: the largest displacement a transform may give, in millimetres (10 m): a field of 1e30 voxels is finite, yet
#: sends every voxel outside the image (an all-zero result, without a word); in millimetres, not voxels, so that a
#: small or finely sampled reference with a distant scanner origin is not refused
MAX_DISPLACEMENT_MM = 1e4


def _plausible(disp: np.ndarray, reference: Volume, paths: Sequence) -> np.ndarray:
    if not np.size(disp):
        return disp
    largest = max(float(np.max(disp)), -float(np.min(disp)))  # no full-size copy (np.abs would make one)
    spacing = float(np.max(np.linalg.norm(np.asarray(reference.affine)[:3, :3], axis=0)))
    if largest * spacing > MAX_DISPLACEMENT_MM:
        source = paths[0] if len(paths) == 1 else "the transforms"
        raise InputError(
            source,
            f"moves voxels by up to {largest:.3g} voxels ({largest * spacing:.3g} mm, over {MAX_DISPLACEMENT_MM:g} mm): "
            "not a displacement of this image (its units or format?)",
        )
    return disp


def map_points(paths: Sequence, points: np.ndarray, reference: Optional[Volume], fmt: str = "auto") -> np.ndarray:
    """World points of the reference (``(N, 3)``, RAS mm) through the chain: their points in the moving image."""
    return itk.apply_maps(read_chain(paths, reference, fmt), points)
