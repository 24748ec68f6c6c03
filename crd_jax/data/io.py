"""Reading and writing volumes: NIfTI (nibabel, affine and header kept) and VoxelMorph ``.npz``; as inputs also
FreeSurfer's ``.mgz``/``.mgh`` (nibabel) and NRRD/MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``: SimpleITK,
the ``itk`` extra), placed in the world by their own geometry (ITK's LPS frame turned into NIfTI's RAS).

Every problem with a file raises :class:`crd_jax.errors.InputError` naming the file: unreadable or
truncated, wrong rank, NaN/Inf voxels, label maps that are not integers. Writes are atomic: the data
go to a temporary file in the destination folder, which is then renamed over the target, so a reader
never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import nibabel as nib
import numpy as np
import numpy.typing as npt

from crd_jax.errors import InputError
from crd_jax.outputs import share_file

PathLike = Union[str, os.PathLike]
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MGH_SUFFIXES = (".mgz", ".mgh")
ITK_IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: every image format an input may be in (outputs are NIfTI)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + (".npz",) + MGH_SUFFIXES + ITK_IMAGE_SUFFIXES


@dataclasses.dataclass
class Volume:
    """An array with the geometry it came with: ``affine`` (voxel -> world, mm) and the NIfTI header."""

    data: np.ndarray
    affine: np.ndarray
    header: Optional[nib.Nifti1Header] = None
    path: Optional[str] = None

    @property
    def spacing(self) -> Tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, : self.data.ndim] ** 2).sum(axis=0)))


def is_nifti(path: PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def check_input_file(path: PathLike, what: str = "an image file") -> Path:
    """``path`` must be an existing regular file: a FIFO, a device or a socket would block or never end a
    read, a folder is not a file. One-line :class:`InputError` otherwise."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, f"is a folder, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise InputError(path, f"is {kind}, not a regular file; expected {what}")
    return path


def max_input_bytes() -> int:
    """The largest voxel payload an input may claim: ``CRD_JAX_MAX_INPUT_BYTES``, else half of this machine's
    memory (a registration holds several float32 copies of its inputs)."""
    env = os.environ.get("CRD_JAX_MAX_INPUT_BYTES", "")
    if env.strip().isdigit():
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _header_from_bytes(head: bytes):
    """The raw NIfTI-1 or -2 header at the start of ``head`` (``None`` when it is neither)."""
    import io

    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)
        if size == 348 and len(head) >= 348:
            return nib.Nifti1Header.from_fileobj(io.BytesIO(head[:348]), check=False)
        if size == 540 and len(head) >= 540:
            return nib.Nifti2Header.from_fileobj(io.BytesIO(head[:540]), check=False)
    return None


def _claimed_bytes(header, path: PathLike) -> int:
    """Bytes of the file a header claims (offset + voxels); refused when beyond :func:`max_input_bytes`."""
    shape = header.get_data_shape()
    if any(int(s) < 0 for s in shape):
        raise InputError(path, f"header has a negative dimension {tuple(shape)}")
    try:
        dtype = header.get_data_dtype()
    except Exception:
        raise InputError(path, "header has an unknown data type code") from None
    voxels = 1
    for n in shape:
        voxels *= int(n)
    payload = voxels * dtype.itemsize
    limit = max_input_bytes()
    if payload > limit:
        raise InputError(
            path,
            f"header claims {payload / 1e9:.3g} GB of voxels ({'x'.join(map(str, shape))} {dtype}), "
            f"more than the {limit / 1e9:.3g} GB allowed (half this machine's memory; "
            "CRD_JAX_MAX_INPUT_BYTES); nothing was read",
        )
    return max(0, int(header["vox_offset"])) + payload


def _inflate(raw: bytes, limit: int) -> bytes:
    """The gzip stream ``raw`` (one or more members) inflated to at most ``limit`` bytes, with ISA-L where
    installed (about twice as fast as zlib); a stream that would inflate further is cut there."""
    try:
        from isal import isal_zlib as module
    except ImportError:
        module = zlib
    out = bytearray()
    data = raw
    while data and len(out) < limit:
        d = module.decompressobj(31)
        out += d.decompress(data, limit - len(out))
        if not d.eof:
            break  # the limit reached, or a truncated stream (nibabel then reports the missing bytes)
        data = d.unused_data
    return bytes(out)


# deflate cannot expand data by more than ~1032x: a header that claims more than this per stored byte belongs
# to a damaged or hostile file, refused before anything is inflated
DEFLATE_MAX_RATIO = 1100


def _load_nifti(path: Path):
    """:func:`_load_nifti_with_header`'s image."""
    return _load_nifti_with_header(path)[0]


def _load_nifti_with_header(path: Path):
    """``(image, raw header)`` of a NIfTI file, read into memory (never memory-mapped: a file truncated while
    it is read would kill the process with SIGBUS). The header is read first and bounds everything: the voxels
    it claims must fit in :func:`max_input_bytes`, and a ``.nii.gz`` is inflated to at most what the header
    claims (a stream that inflates further, a "zip bomb", is cut there). ``.nii.gz`` files are inflated by
    ISA-L where installed."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if str(path).endswith(".gz"):
        try:
            head = zlib.decompressobj(31).decompress(raw, 540)
        except zlib.error as exc:
            raise InputError(path, f"unreadable or truncated file (not a gzip stream: {exc})") from None
        header = _header_from_bytes(head)
        if header is None:
            raise InputError(path, "unreadable or truncated file (no NIfTI-1 or NIfTI-2 header)")
        claimed = _claimed_bytes(header, path)
        if claimed > DEFLATE_MAX_RATIO * len(raw) + (1 << 20):
            raise InputError(
                path,
                f"unreadable or truncated file: its header claims {claimed / 1e6:.4g} MB, more than "
                f"a {len(raw) / 1e6:.3g} MB gzip stream can hold",
            )
        raw = _inflate(raw, claimed + 1)
    else:
        header = _header_from_bytes(raw[:540])
        if header is None:
            raise InputError(path, "unreadable or truncated file (no NIfTI-1 or NIfTI-2 header)")
        claimed = _claimed_bytes(header, path)
        if len(raw) < claimed:
            raise InputError(path, f"unreadable or truncated file: its header claims {claimed} bytes, the file holds {len(raw)}")
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return kind.from_bytes(raw), header


def _read(path: PathLike, npz_key: str):
    path = check_input_file(path)
    try:
        if str(path).endswith(".npz"):
            with np.load(path) as f:
                if npz_key not in f:
                    raise InputError(path, f"no '{npz_key}' array in the .npz (keys: {sorted(f.keys())})")
                return np.asarray(f[npz_key]), np.eye(4), None
        if str(path).lower().endswith(MGH_SUFFIXES):
            return _read_mgh(path)
        if str(path).lower().endswith(ITK_IMAGE_SUFFIXES):
            return _read_with_simpleitk(path)
        if not is_nifti(path):
            raise InputError(path, "unknown format (expected .nii, .nii.gz, .npz, .mgz, .mgh, .nrrd, .nhdr, .mha or .mhd)")
        img, raw_header = _load_nifti_with_header(path)
        _check_voxel_size(raw_header, path)
        data = np.asanyarray(img.dataobj)
        return data, np.asarray(img.affine, dtype=np.float64), img.header
    except InputError:
        raise
    except MemoryError:
        raise InputError(path, "too large to read into this machine's memory") from None
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise InputError(path, f"unreadable or truncated file ({type(exc).__name__}: {exc})") from None


def _as_nifti_header(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Header:
    """A NIfTI header for voxels read from another format: their type (labels keep it when written) and the
    affine as the sform, so that outputs written with it are placed where the input was."""
    return nib.Nifti1Image(data, affine, dtype=data.dtype if data.dtype.kind in "iuf" else None).header


def _check_claim(path: PathLike, shape, itemsize: int) -> None:
    """The voxels a header claims must fit in :func:`max_input_bytes` (checked before they are read)."""
    payload = int(np.prod([int(s) for s in shape], dtype=np.float64)) * int(itemsize)
    limit = max_input_bytes()
    if payload > limit:
        raise InputError(
            path,
            f"header claims {payload / 1e9:.3g} GB of voxels ({'x'.join(map(str, shape))}), more than "
            f"the {limit / 1e9:.3g} GB allowed (half this machine's memory; CRD_JAX_MAX_INPUT_BYTES); "
            "nothing was read",
        )


def _read_mgh(path: Path):
    """A FreeSurfer ``.mgz``/``.mgh`` volume through nibabel: its voxels and its vox2ras (RAS) affine."""
    img = nib.load(str(path))
    if not isinstance(img, nib.MGHImage):
        raise InputError(path, f"not a FreeSurfer MGH file (nibabel read a {type(img).__name__})")
    _check_claim(path, img.header.get_data_shape(), img.header.get_data_dtype().itemsize)
    data = np.asarray(img.dataobj)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)  # MGH is big-endian on disk
    affine = np.asarray(img.affine, np.float64)
    return data, affine, _as_nifti_header(data, affine)


def _read_with_simpleitk(path: Path):
    """An NRRD or MetaImage volume through SimpleITK (the ``itk`` extra): voxels in index order ``(i, j, k)``
    and the RAS affine of its LPS origin, spacing and direction."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(
            path,
            "reading NRRD/MetaImage files needs SimpleITK, which is not installed: "
            "install it (pip install 'crd-jax[itk]') or convert the file to NIfTI",
        ) from None
    from crd_jax.interop.itk import array_of, ras_affine

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_claim(path, tuple(reader.GetSize()) + (reader.GetNumberOfComponents(),), 8)
        image = reader.Execute()
    except RuntimeError as exc:
        detail = next((l.split("sitk::ERROR:")[-1].strip() for l in str(exc).splitlines() if "sitk::ERROR" in l), "")
        raise InputError(path, "unreadable or truncated file" + (f" ({detail})" if detail else "")) from None
    if image.GetDimension() not in (2, 3):
        raise InputError(path, f"a {image.GetDimension()}-D image; crd-jax reads 2-D and 3-D volumes")
    data = array_of(image)
    affine = ras_affine(image)
    return data, affine, _as_nifti_header(data, affine)


def read_nifti_array(path: PathLike, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """The voxels of a NIfTI file (a displacement field, ...) as ``dtype``: a regular file, read into memory with
    the size bounds of :func:`_load_nifti`; any problem is a one-line :class:`InputError`."""
    path = check_input_file(path, "a NIfTI file")
    if not is_nifti(path):
        raise InputError(path, "unknown format (expected .nii or .nii.gz)")
    try:
        return np.asarray(_load_nifti(path).dataobj, dtype)
    except InputError:
        raise
    except MemoryError:
        raise InputError(path, "too large to read into this machine's memory") from None
    except Exception as exc:
        raise InputError(path, f"unreadable or truncated file ({type(exc).__name__}: {exc})") from None


def _check_voxel_size(raw, path: PathLike) -> None:
    """nibabel silently replaces zero voxel sizes by 1 mm when it reads a header: ``raw`` is the raw one."""
    ndim = min(int(raw["dim"][0]), 3)
    zooms = np.asarray(raw["pixdim"][1 : 1 + ndim], np.float64)
    if np.any(~np.isfinite(zooms)) or np.any(zooms <= 0):
        raise InputError(
            path,
            f"voxel size {tuple(float(z) for z in zooms)} in the header has a zero, negative or "
            "NaN entry (a damaged or non-conformant NIfTI header)",
        )


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
        raise InputError(
            path,
            f"degenerate geometry: voxel size {tuple(round(float(v), 4) for v in spacing)} mm "
            "(a zero voxel size in the header, or a singular affine)",
        )
    if np.any(spacing > MAX_VOXEL_MM):
        raise InputError(
            path,
            f"voxel size {tuple(round(float(v), 4) for v in spacing)} mm: above {MAX_VOXEL_MM:g} mm, "
            "not a scan's (a header in other units, or a damaged affine)",
        )


MAX_VOXEL_MM = 100.0  # as model.json's geometry.spacing


def check_orientation(header: Optional[nib.Nifti1Header], path: PathLike) -> None:
    """A NIfTI file must say where its voxels are: with neither a qform nor an sform (both codes 0) nibabel
    assumes an orientation, and registering it against an image with a real affine is meaningless."""
    if header is None:
        return
    try:
        q, s = int(header["qform_code"]), int(header["sform_code"])
    except (KeyError, ValueError, TypeError):
        return
    if q == 0 and s == 0:
        raise InputError(
            path,
            "has neither a qform nor an sform (qform_code = sform_code = 0), so its orientation in "
            "space is unknown; set one (e.g. fslorient -copyqform2sform, or nibabel) first",
        )


def load_image(path: PathLike, ndim: int = 3, require_orientation: bool = False) -> Volume:
    """An intensity image as float32; rejects wrong rank, degenerate geometry and non-finite voxels
    (``require_orientation``: and NIfTI files with neither a qform nor an sform)."""
    data, affine, header = _read(path, "vol")
    if require_orientation:
        check_orientation(header, path)
    data = _fix_rank(np.asarray(data), ndim, path, "image")
    _check_geometry(affine, ndim, path)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(path, f"image has non-numeric type {data.dtype}")
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, f"image has {int(bad.sum())} NaN/Inf voxels")
    return Volume(data, affine, header, str(path))


INT64_LIMIT = 2.0**63


def load_labels(path: PathLike, ndim: int = 3, require_orientation: bool = False) -> Volume:
    """A label map as int32, or int64 where a label does not fit in int32 (values are kept exactly); float
    files are accepted only if every value is an integer."""
    data, affine, header = _read(path, "seg")
    if require_orientation:
        check_orientation(header, path)
    data = _fix_rank(np.asarray(data), ndim, path, "label map")
    _check_geometry(affine, ndim, path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise InputError(path, "label map has NaN/Inf values")
        if not np.array_equal(data, np.round(data)):
            raise InputError(path, "label map has non-integer values (is this an intensity image?)")
        if data.size and float(np.abs(data).max()) >= INT64_LIMIT:
            raise InputError(path, f"label map has values up to {float(np.abs(data).max()):g}, beyond 64-bit integers")
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise InputError(path, f"label map has non-integer type {data.dtype}")
    elif data.dtype == np.uint64 and data.size and int(data.max()) > np.iinfo(np.int64).max:
        raise InputError(path, f"label map has values up to {int(data.max())}, beyond signed 64-bit integers")
    if data.size == 0 or data.dtype == bool:
        return Volume(data.astype(np.int32), affine, header, str(path))
    wide = data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max
    return Volume(data.astype(np.int64 if wide else np.int32), affine, header, str(path))


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
    img = nib.Nifti1Image(data, affine, hdr, dtype=data.dtype)  # explicit: nibabel refuses 64-bit integers otherwise
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
            slab = plane[start : start + step]
            out = np.empty(slab.shape, slab.dtype)
            for c in range(0, slab.shape[-1], 32):
                out[..., c : c + 32] = slab[..., c : c + 32]
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
    return list(_compressed((bytes(view[i : i + chunk]) for i in range(0, max(len(raw), 1), chunk)), level))


def save_npz(path: PathLike, **arrays: npt.ArrayLike) -> None:
    """``np.savez_compressed`` written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
