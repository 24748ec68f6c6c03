"""The compact displacement: the field at the network's resolution plus what expands it onto the fixed grid.

A registration's full-size field is a smooth function of the network's output (a 64x80x64 grid for the
shipped LPBA40 models): the canvas is cropped to the model's grid, resized to the fixed grid, reoriented from
the model's orientation to the image's, and composed with the affine pre-alignment
(:func:`crd_jax.registration.pipeline.register_volumes`). ``--disp-format compact`` stores the network's field
and those few numbers in one ``.npz`` (numeric arrays only, read without pickle): a few MB instead of ~50 MB
at 1 mm. :func:`expand` is the one function that turns it back into the full field; it runs the same compiled
steps the registration ran, so the expanded field is the one ``--disp-format voxel`` writes (to float32
rounding; tests/test_batch.py checks 1e-4 voxels).

Keys of the file (all numeric): ``format`` (``[FORMAT_VERSION]``), ``canvas`` (the network's field,
``(*canvas, ndim)`` float32, voxels of the model's grid scaled to the fixed grid's), ``windows``
(``(ndim, 4)``: the canvas -> model-grid crop and edge padding), ``work`` (the model's grid), ``grid`` (the
fixed image's shape), ``fixed_affine`` (4x4, the fixed image's NIfTI affine), and optionally ``orientation``
(``(ndim, 2)``: nibabel's orientation transform, model axes -> image axes, each axis once with a sign) and
``affine_matrix`` / ``affine_translation`` (the affine pre-alignment, voxels of the fixed grid). :func:`read`
checks every one of them before anything is expanded.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from crd_jax.errors import InputError

if TYPE_CHECKING:
    import jax

    from crd_jax.affine_align import AffineResult
    from crd_jax.data.io import PathLike
    from crd_jax.registration.pipeline import Prepared

FORMAT_VERSION = 1
#: the file name ``register --disp-format compact`` writes
NAME = "disp_compact.npz"
_REQUIRED = ("format", "canvas", "windows", "work", "grid", "fixed_affine")


@dataclasses.dataclass(frozen=True)
class NetworkField:
    """The network's field and the steps that map it onto the fixed grid (what :func:`save` writes)."""

    canvas: np.ndarray  # (*canvas, ndim) float32
    windows: Tuple[Tuple[int, int, int, int], ...]  # per axis: canvas start, stop, pad before, pad after
    work: Tuple[int, ...]
    grid: Tuple[int, ...]
    orientation: Optional[np.ndarray] = None  # space.to_model_space's transform, or None (same axes)
    affine_matrix: Optional[np.ndarray] = None
    affine_translation: Optional[np.ndarray] = None

    @classmethod
    def of(
        cls,
        prepared: Prepared,
        disp_canvas: np.ndarray | jax.Array,
        transform: Optional[np.ndarray] = None,
        affine_result: Optional[AffineResult] = None,
    ) -> "NetworkField":
        """From :func:`~crd_jax.registration.pipeline.prepare`'s result, the predicted canvas field, the
        reorientation transform and the affine pre-alignment of one registration."""
        src, dst = prepared.placement._windows()
        windows = tuple((d.start, d.stop, s.start, n - s.stop) for s, d, n in zip(src, dst, prepared.placement.source_shape))
        canvas = np.asarray(disp_canvas, np.float32)
        canvas = canvas[0] if canvas.ndim == len(prepared.grid) + 2 else canvas
        return cls(
            canvas,
            windows,
            tuple(prepared.work),
            tuple(prepared.grid),
            None if transform is None else np.asarray(transform, np.float64),
            None if affine_result is None else np.asarray(affine_result.matrix, np.float64),
            None if affine_result is None else np.asarray(affine_result.translation, np.float64),
        )

    def expand(self) -> jax.Array:
        """The full field on the fixed grid (a JAX array, voxels): the registration's own steps, in its order."""
        import jax.numpy as jnp

        from crd_jax.registration import space
        from crd_jax.registration.pipeline import _map_back

        disp = _map_back(
            jnp.asarray(self.canvas),
            tuple(tuple(int(v) for v in w) for w in self.windows),
            tuple(int(v) for v in self.work),
            tuple(int(v) for v in self.grid),
        )
        if self.orientation is not None:
            disp = space.field_to_original(disp, self.orientation, self.grid)
        if self.affine_matrix is not None:
            from crd_jax.affine_align import AffineResult
            from crd_jax.ops.spatial import compose

            affine = AffineResult(self.affine_matrix, self.affine_translation, 0.0, 0.0)
            disp = compose(jnp.asarray(affine.displacement(self.grid))[None], disp[None])[0]
        return disp


def save(path: PathLike, field: NetworkField, fixed_affine: np.ndarray) -> None:
    """Writes ``field`` with the fixed image's affine as one ``.npz`` (atomically, numeric arrays only)."""
    from crd_jax.data.io import save_npz

    arrays = {
        "format": np.asarray([FORMAT_VERSION], np.int32),
        "canvas": field.canvas.astype(np.float32),
        "windows": np.asarray(field.windows, np.int64).reshape(len(field.grid), 4),
        "work": np.asarray(field.work, np.int64),
        "grid": np.asarray(field.grid, np.int64),
        "fixed_affine": np.asarray(fixed_affine, np.float64),
    }
    if field.orientation is not None:
        arrays["orientation"] = field.orientation
    if field.affine_matrix is not None:
        arrays["affine_matrix"], arrays["affine_translation"] = field.affine_matrix, field.affine_translation
    save_npz(path, **arrays)


def is_compact(path: PathLike) -> bool:
    """Whether ``path`` is a compact displacement file (a ``.npz`` holding this module's keys)."""
    if not str(path).endswith(".npz"):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return False
    return set(_REQUIRED) <= names


def read(path: PathLike) -> Tuple[NetworkField, np.ndarray]:
    """``(field, fixed_affine)`` of a compact file; a damaged or foreign file is one :class:`InputError` line."""
    from crd_jax.data.io import check_input_file

    check_input_file(path, "a compact displacement (.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _REQUIRED if k not in f]
            if missing:
                raise InputError(path, f"not a compact displacement (no {', '.join(missing)} in the .npz)")
            a = {k: np.asarray(f[k]) for k in f.keys()}
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"unreadable compact displacement ({type(exc).__name__}: {exc})") from None
    _check(path, a)
    field = NetworkField(
        a["canvas"].astype(np.float32),
        tuple(tuple(int(v) for v in w) for w in a["windows"]),
        tuple(int(v) for v in a["work"]),
        tuple(int(v) for v in a["grid"]),
        a.get("orientation"),
        a.get("affine_matrix"),
        a.get("affine_translation"),
    )
    return field, a["fixed_affine"]


def _integers(a: np.ndarray, shape: tuple) -> bool:
    return a.shape == shape and a.dtype.kind in "iu"


def _check(path: PathLike, a: dict) -> None:
    """Every number of a compact file, before anything is expanded (a damaged or edited file is one line, not a
    traceback, an abort in XLA for an absurd grid, or a silently meaningless field)."""
    from crd_jax.data.io import max_input_bytes
    from crd_jax.registration.checks import MAX_WORK_SIDE, MAX_WORK_VOXELS

    def bad(problem: str):
        raise InputError(path, f"damaged compact displacement: {problem}")

    if not _integers(a["format"], (1,)):
        bad(f"format must be one integer, got {a['format'].tolist()!r:.60}")
    if int(a["format"][0]) > FORMAT_VERSION:
        raise InputError(path, f"compact format {int(a['format'][0])} is newer than this crd-jax reads ({FORMAT_VERSION})")
    grid = a["grid"]
    ndim = grid.size
    if grid.ndim != 1 or ndim not in (2, 3) or not _integers(grid, (ndim,)) or (grid < 1).any():
        bad(f"grid must be 2 or 3 positive integers, got {grid.tolist()!r:.60}")
    if int(np.prod(grid, dtype=object)) * ndim * 4 > max_input_bytes():
        bad(f"its grid {tuple(grid.tolist())} would need more memory than an input may claim (CRD_JAX_MAX_INPUT_BYTES)")
    work = a["work"]
    if (
        not _integers(work, (ndim,))
        or (work < 1).any()
        or work.max() > MAX_WORK_SIDE
        or np.prod(work, dtype=object) > MAX_WORK_VOXELS
    ):
        bad(f"work (the model's grid) must be {ndim} integers from 1 to {MAX_WORK_SIDE}, got {work.tolist()!r:.60}")
    canvas, windows = a["canvas"], a["windows"]
    if canvas.ndim != ndim + 1 or canvas.shape[-1] != ndim or not _integers(windows, (ndim, 4)):
        raise InputError(path, f"compact displacement of shape {canvas.shape} does not match its grid {tuple(grid.tolist())}")
    for axis, (start, stop, before, after) in enumerate(windows.tolist()):
        inside = 0 <= start < stop <= canvas.shape[axis] and before >= 0 and after >= 0
        if not inside or stop - start + before + after != work[axis]:
            bad(f"window {windows[axis].tolist()} of axis {axis} does not map its canvas onto work {work.tolist()}")
    if canvas.dtype.kind != "f" or not np.all(np.isfinite(canvas)):
        raise InputError(path, "compact displacement holds NaN/Inf values")
    affine = a["fixed_affine"]
    if affine.shape != (4, 4) or affine.dtype.kind not in "fiu" or not np.isfinite(affine).all():
        bad("fixed_affine must be a finite 4x4 matrix")
    from crd_jax.data.io import _check_geometry

    _check_geometry(affine.astype(np.float64), ndim, path)  # the checks the fixed image itself passed when read
    if "orientation" in a:
        o = a["orientation"]
        if o.shape != (ndim, 2) or not np.isfinite(o).all() or sorted(o[:, 0].tolist()) != list(range(ndim)):
            bad("orientation must pair each axis once with a sign (nibabel's orientation transform)")
        if not set(o[:, 1].tolist()) <= {-1.0, 1.0}:
            bad("orientation signs must be +1 or -1")
    if ("affine_matrix" in a) != ("affine_translation" in a):
        bad("affine_matrix and affine_translation come together")
    if "affine_matrix" in a:
        m, t = a["affine_matrix"], a["affine_translation"]
        if m.shape != (ndim, ndim) or t.shape != (ndim,) or not (np.isfinite(m).all() and np.isfinite(t).all()):
            bad(f"the affine pre-alignment must be a finite {ndim}x{ndim} matrix and {ndim} translations")


def expand(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """``(field, affine)``: a compact file's full displacement ``(*grid, ndim)`` float32 in voxels of the fixed
    grid (``--disp-format voxel``'s field) and the fixed image's 4x4 affine. What ``apply`` and ``export`` call."""
    field, affine = read(Path(path))
    return np.asarray(field.expand(), np.float32), affine
