"""Reading and writing volumes: NIfTI (nibabel, affine and header kept) and VoxelMorph ``.npz``.

Every problem with a file raises :class:`crd_jax.errors.InputError` naming the file: unreadable or
truncated, wrong rank, NaN/Inf voxels, label maps that are not integers. Writes are atomic: the data
go to a temporary file in the destination folder, which is then renamed over the target, so a reader
never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Union

import nibabel as nib
import numpy as np

from crd_jax.errors import InputError
from crd_jax.outputs import share_file

PathLike = Union[str, os.PathLike]
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass
class Volume:
    """An array with the geometry it came with: ``affine`` (voxel -> world, mm) and the NIfTI header."""

    data: np.ndarray
    affine: np.ndarray
    header: Optional[nib.Nifti1Header] = None
    path: Optional[str] = None

    @property
    def spacing(self):
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, : self.data.ndim] ** 2).sum(axis=0)))


def is_nifti(path: PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def _load_nifti(path: Path):
    """``nib.load``, with ``.nii.gz`` files inflated by ISA-L (the ``isal`` package, already used for writing)
    where it is installed: about twice as fast as the zlib stream nibabel reads them through (~0.1 s of a
    ``crd-jax register`` call at OASIS size)."""
    if str(path).endswith(".gz"):
        try:
            from isal import igzip
        except ImportError:
            return nib.load(str(path))
        with open(path, "rb") as f:
            raw = igzip.decompress(f.read())
        sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
        kind = nib.Nifti1Image if 348 in sizeof_hdr else nib.Nifti2Image if 540 in sizeof_hdr else None
        if kind is not None:
            return kind.from_bytes(raw)
    return nib.load(str(path))


def _read(path: PathLike, npz_key: str):
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, expected an image file")
    try:
        if str(path).endswith(".npz"):
            with np.load(path) as f:
                if npz_key not in f:
                    raise InputError(path, f"no '{npz_key}' array in the .npz (keys: {sorted(f.keys())})")
                return np.asarray(f[npz_key]), np.eye(4), None
        if not is_nifti(path):
            raise InputError(path, "unknown format (expected .nii, .nii.gz or .npz)")
        img = _load_nifti(path)
        _check_voxel_size(img, path)
        data = np.asanyarray(img.dataobj)
        return data, np.asarray(img.affine, dtype=np.float64), img.header
    except InputError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise InputError(path, f"unreadable or truncated file ({type(exc).__name__}: {exc})") from None


def _check_voxel_size(img, path: PathLike) -> None:
    """nibabel silently replaces zero voxel sizes by 1 mm when it reads a header: read the raw one."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    ndim = min(int(raw["dim"][0]), 3)
    zooms = np.asarray(raw["pixdim"][1 : 1 + ndim], np.float64)
    if np.any(~np.isfinite(zooms)) or np.any(zooms <= 0):
        raise InputError(path, f"voxel size {tuple(float(z) for z in zooms)} in the header has a zero, negative or "
                               "NaN entry (a damaged or non-conformant NIfTI header)")


def _fix_rank(data: np.ndarray, ndim: int, path: PathLike, what: str) -> np.ndarray:
    # NIfTI stores 2-D slices as (X, Y, 1) and some tools add trailing singleton axes.
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise InputError(path, f"{what} has shape {data.shape} ({data.ndim}-D), expected a {ndim}-D volume")
    return data


def _check_geometry(affine: np.ndarray, ndim: int, path: PathLike) -> None:
    linear = affine[:ndim, :ndim]
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine holds NaN/Inf values")
    spacing = np.sqrt((linear**2).sum(axis=0))
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(linear)) <= 1e-9 * float(np.prod(np.maximum(spacing, 1e-6))):
        raise InputError(path, f"degenerate geometry: voxel size {tuple(round(float(v), 4) for v in spacing)} mm "
                               "(a zero voxel size in the header, or a singular affine)")


def load_image(path: PathLike, ndim: int = 3) -> Volume:
    """An intensity image as float32; rejects wrong rank, degenerate geometry and non-finite voxels."""
    data, affine, header = _read(path, "vol")
    data = _fix_rank(np.asarray(data), ndim, path, "image")
    _check_geometry(affine, ndim, path)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(path, f"image has non-numeric type {data.dtype}")
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, f"image has {int(bad.sum())} NaN/Inf voxels")
    return Volume(data, affine, header, str(path))


def load_labels(path: PathLike, ndim: int = 3) -> Volume:
    """A label map as int32; float files are accepted only if every value is an integer."""
    data, affine, header = _read(path, "seg")
    data = _fix_rank(np.asarray(data), ndim, path, "label map")
    _check_geometry(affine, ndim, path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise InputError(path, "label map has NaN/Inf values")
        if not np.array_equal(data, np.round(data)):
            raise InputError(path, "label map has non-integer values (is this an intensity image?)")
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise InputError(path, f"label map has non-integer type {data.dtype}")
    return Volume(data.astype(np.int32), affine, header, str(path))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        share_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_nifti(
    path: PathLike,
    data: np.ndarray,
    affine: Optional[np.ndarray] = None,
    header: Optional[nib.Nifti1Header] = None,
    intent: Optional[str] = None,
) -> None:
    """Writes ``data`` as NIfTI with the given geometry (a source volume's affine and header), atomically."""
    data = np.asarray(data)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, hdr)
    img.set_data_dtype(data.dtype)
    if data.dtype.kind == "f":
        # Source images may carry scl_slope/inter; float outputs are stored as-is.
        img.header.set_slope_inter(1.0, 0.0)
    if intent is not None:
        img.header.set_intent(intent)
    with atomic_path(path) as tmp:
        write_nifti_stream(tmp, img, data, compress=str(path).endswith(".gz"))


def nifti_blocks(img: nib.Nifti1Image, data: np.ndarray, block: int = 4 << 20) -> Iterator[bytes | memoryview]:
    """The bytes of ``img`` as a single-file NIfTI (header, extensions, then ``data`` in the file's Fortran
    order), in blocks of about ``block`` bytes, without a copy of the whole array."""
    import io

    img.update_header()
    hdr = img.header
    head = io.BytesIO()
    hdr.write_to(head)  # the header, the extension flag and any extensions; sets vox_offset if unset
    offset = int(hdr["vox_offset"])
    if offset < len(head.getvalue()):
        raise ValueError(f"NIfTI vox_offset {offset} is inside the header and extensions ({len(head.getvalue())} bytes)")
    yield head.getvalue() + b"\0" * (offset - len(head.getvalue()))
    arr = np.asarray(data, dtype=hdr.get_data_dtype())
    if arr.ndim < 2:
        yield arr.tobytes(order="F")
        return
    reversed_axes = arr.T  # C order of the reversed axes is the file's Fortran order
    # Slabs of whole rows of the third-last axis (the second-last of a 2-D array), ~`block` bytes each, filled
    # in tiles of a few columns of the last axis: each tile reads runs of the source's fastest axes, where
    # copying a plane at a time strode across the whole array for every element (writing a 160x192x224 field,
    # compressed, took 0.4 s; 0.2 s now)
    rest = reversed_axes.shape[-2:] if arr.ndim >= 3 else reversed_axes.shape[-1:]
    rows = reversed_axes.shape[-len(rest) - 1]
    step = max(1, block // max(1, int(np.prod(rest)) * arr.itemsize))
    for index in np.ndindex(*reversed_axes.shape[: -len(rest) - 1]):
        plane = reversed_axes[index]
        for start in range(0, rows, step):
            slab = plane[start:start + step]
            out = np.empty(slab.shape, slab.dtype)
            for c in range(0, slab.shape[-1], 32):
                out[..., c:c + 32] = slab[..., c:c + 32]
            yield memoryview(out).cast("B")


def write_nifti_stream(path: PathLike, img: nib.Nifti1Image, data: np.ndarray, compress: bool, level: int = 1) -> None:
    """Writes ``img`` block by block: as it is, or as gzip members compressed on all the process's CPUs
    (:func:`gzip_members`); memory stays a few blocks whatever the volume's size."""
    blocks = nifti_blocks(img, data)
    with open(path, "wb") as f:
        if not compress:
            for b in blocks:
                f.write(b)
            return
        for member in _compressed(blocks, level):
            f.write(member)


def _compressed(blocks: Iterator[bytes], level: int) -> Iterator[bytes]:
    """Each block as one gzip member, in order, at most ``2 x workers`` blocks in flight."""
    from concurrent.futures import ThreadPoolExecutor

    workers = _workers()
    with ThreadPoolExecutor(workers) as pool:
        window = []
        for b in blocks:
            window.append(pool.submit(_gzip_member, b, level))
            if len(window) >= 2 * workers:
                yield window.pop(0).result()
        for future in window:
            yield future.result()


def _deflate_module(level: int):
    """ISA-L's deflate (the ``isal`` package) for levels 0-3, where it is installed: at level 1 it compresses
    displacement fields ~10x faster than zlib to the same size, and writes ordinary gzip. zlib otherwise."""
    if level <= 3:
        try:
            from isal import isal_zlib

            return isal_zlib
        except ImportError:
            pass
    return zlib


def _gzip_member(raw: bytes, level: int) -> bytes:
    module = _deflate_module(level)
    c = module.compressobj(level, module.DEFLATED, 31)  # wbits 31: a gzip header and trailer
    return c.compress(raw) + c.flush()


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gzip_members(raw: bytes, level: int = 1, chunk: int = 4 << 20) -> List[bytes]:
    """``raw`` as consecutive gzip members of ``chunk`` bytes each, compressed on all the process's CPUs
    (zlib releases the GIL). Concatenated members are one valid gzip file (RFC 1952; zlib's ``gzread``,
    Python's ``gzip`` and every NIfTI reader built on them read through all members)."""
    view = memoryview(raw)
    return list(_compressed((bytes(view[i:i + chunk]) for i in range(0, max(len(raw), 1), chunk)), level))


def save_npz(path: PathLike, **arrays) -> None:
    """``np.savez_compressed`` written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
