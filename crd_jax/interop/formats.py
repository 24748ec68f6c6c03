"""Displacement-field formats, and moving images brought onto the fixed image's grid.

Our field (``voxel``): ``(*spatial, ndim)`` float32, in voxels of the fixed grid, channel ``k`` along array
axis ``k``, pull convention (``warped(x) = moving(x + u(x))``); written as NIfTI with the fixed image's
affine.

``itk``: the layout ANTs, ITK and 3D Slicer read as a displacement-field transform: a 5-D NIfTI
``(X, Y, Z, 1, 3)`` with intent ``vector``, the fixed image's affine, and vectors in millimetres in ITK's
LPS physical frame. For a fixed voxel ``i`` the physical point is ``p = A i`` (RAS, the NIfTI affine ``A``);
ITK samples the moving image at ``p + d`` with ``d`` in LPS, so ``d = diag(-1, -1, 1) A[:3, :3] u``. Beside it,
``composite.h5``: ITK's composite transform file (the affine pre-alignment, then the deformable field), which
``antsApplyTransforms -t composite.h5`` and SimpleITK's ``ReadTransform`` apply (:mod:`crd_jax.interop.itk`;
it needs SimpleITK).

``learn2reg``: the 2021 task-3 submission layout, ``disp_FFFF_MMMM.npz`` holding one float16 array
``(3, X/2, Y/2, Z/2)`` in voxels (channel-first; the evaluation upsamples it by 2), plus the full-resolution
``disp_FFFF_MMMM.nii.gz`` ``(X, Y, Z, 3)`` of the 2022+ challenges.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from crd_jax.data.io import PathLike, Volume, save_nifti, save_npz

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
FORMATS = ("voxel", "itk", "learn2reg")


def voxel_to_physical(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacements ``(*spatial, 3)`` -> millimetres in the RAS world frame of ``affine``."""
    return np.einsum("ij,...j->...i", np.asarray(affine)[:3, :3], disp)


def to_itk(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(X, Y, Z, 3)`` voxels -> ``(X, Y, Z, 1, 3)`` millimetres, LPS (what ITK's NIfTI reader expects)."""
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"the ITK format is for 3-D fields (X, Y, Z, 3), got {disp.shape}")
    lps = np.einsum("ij,...j->...i", RAS_TO_LPS, voxel_to_physical(disp, affine))
    return lps[:, :, :, None, :].astype(np.float32)


def from_itk(field: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_itk`."""
    field = np.asarray(field, np.float64).reshape(*field.shape[:3], 3)
    ras = np.einsum("ij,...j->...i", RAS_TO_LPS, field)
    return np.einsum("ij,...j->...i", np.linalg.inv(np.asarray(affine)[:3, :3]), ras).astype(np.float32)


def to_learn2reg(disp: np.ndarray) -> np.ndarray:
    """``(X, Y, Z, 3)`` -> ``(3, X/2, Y/2, Z/2)`` float16 (linear downsampling, half-pixel centres)."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    chw = np.moveaxis(np.asarray(disp, np.float32), -1, 0)
    half = [max(1, s // 2) for s in chw.shape[1:]]
    zoom = [1.0] + [h / s for h, s in zip(half, chw.shape[1:])]
    return ndimage.zoom(chw, zoom, order=1, grid_mode=True, mode="nearest").astype(np.float16)


def from_learn2reg(field: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """``(3, X/2, Y/2, Z/2)`` -> ``(X, Y, Z, 3)`` at ``shape`` (what the challenge's evaluation does)."""
    from scipy import ndimage  # here, not at import: it costs ~0.25 s of every command's start

    field = np.asarray(field, np.float32)
    zoom = [1.0] + [t / s for t, s in zip(shape, field.shape[1:])]
    return np.moveaxis(ndimage.zoom(field, zoom, order=1, grid_mode=True, mode="nearest"), 0, -1)


def displacement_names(
    fmt: str, name: str = "disp", pair_ids: Optional[Tuple[str, str]] = None, ext: str = ".nii.gz"
) -> List[str]:
    """The file names :func:`write_displacement` writes for format ``fmt`` (NIfTI files end in ``ext``)."""
    if fmt == "voxel":
        return [f"{name}{ext}"]
    if fmt == "itk":
        # named before anything is computed: a missing SimpleITK is found then, not after the registration
        from crd_jax.interop.itk import simpleitk

        simpleitk("--disp-format itk", "writing the ITK composite transform (composite.h5)")
        return [f"{name}_itk{ext}", "composite.h5" if name == "disp" else f"{name}_composite.h5"]
    if fmt == "learn2reg":
        f_id, m_id = pair_ids or ("0000", "0001")
        return [f"disp_{f_id}_{m_id}.npz", f"disp_{f_id}_{m_id}{ext}"]
    raise ValueError(f"unknown displacement format {fmt!r} ({', '.join(FORMATS)})")


def write_displacement(
    out_dir: Path,
    disp: np.ndarray,
    fixed: Volume,
    fmt: str,
    name: str = "disp",
    pair_ids: Optional[Tuple[str, str]] = None,
    ext: str = ".nii.gz",
    world: Optional[np.ndarray] = None,
) -> list:
    """Writes ``disp`` (fixed grid, voxels) in format ``fmt``; returns the paths written. ``world``: the affine
    pre-alignment composed into ``disp`` (RAS fixed world -> moving world), which the ITK composite stores as
    its own affine transform (``None``: an identity there, the whole map in the field)."""
    paths = [Path(out_dir) / n for n in displacement_names(fmt, name, pair_ids, ext)]
    if fmt == "voxel":
        save_nifti(paths[0], np.asarray(disp, np.float32), fixed.affine, None, intent="vector")
    elif fmt == "itk":
        save_nifti(paths[0], to_itk(disp, fixed.affine), fixed.affine, None, intent="vector")
        from crd_jax.interop.itk import write_composite

        write_composite(paths[1], np.asarray(disp), fixed.affine, world)
    else:
        save_npz(paths[0], arr_0=to_learn2reg(disp))
        save_nifti(paths[1], disp.astype(np.float32), fixed.affine, None, intent="vector")
    return paths


def read_displacement(path: PathLike, reference: Volume, fmt: str = "auto") -> np.ndarray:
    """A saved displacement as ``(*reference grid, 3)`` voxels of the reference. ``fmt``: ``voxel`` (ours),
    ``itk`` (ANTs/ITK/Slicer, mm LPS), ``learn2reg`` (``.npz`` at half size), or ``auto``: from the name, and a
    5-D NIfTI ``(X, Y, Z, 1, 3)`` is ITK's."""
    from crd_jax.errors import InputError

    name = str(path)
    auto = fmt == "auto"
    if auto:
        fmt = "learn2reg" if name.endswith(".npz") else "itk" if name.endswith(("_itk.nii.gz", "_itk.nii")) else "voxel"
    from crd_jax.data.io import check_input_file, read_nifti_array

    check_input_file(path, "a displacement file")
    if fmt == "learn2reg" and not name.endswith(".npz"):
        raise InputError(
            path,
            "the Learn2Reg format is a .npz file (disp_FFFF_MMMM.npz); for a NIfTI field use --disp-format voxel, itk or auto",
        )
    try:
        if fmt == "learn2reg":
            with np.load(name) as f:
                key = "arr_0" if "arr_0" in f else next(iter(f.keys()))
                field = from_learn2reg(f[key], reference.data.shape)
        else:
            raw = read_nifti_array(name)
            if auto and fmt == "voxel" and raw.ndim == 5:
                fmt = "itk"  # ITK's 5-D layout (X, Y, Z, 1, 3), as ANTs writes its *Warp.nii.gz, whatever the name
            field = from_itk(raw, reference.affine) if fmt == "itk" else raw
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable displacement ({type(exc).__name__}: {exc})") from None
    want = (*reference.data.shape, reference.data.ndim)
    if field.shape != want:
        raise InputError(path, f"displacement of shape {field.shape} does not fit the reference grid {want} ({fmt} format)")
    bad = int((~np.isfinite(field)).sum())
    if bad:
        raise InputError(path, f"displacement holds {bad} NaN/Inf values")
    return field.astype(np.float32)
