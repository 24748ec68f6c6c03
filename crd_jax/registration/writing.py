"""Writing a registration: the set of files one pair produces (named before anything is computed, so that a
refusal leaves nothing), in the project's formats (:mod:`crd_jax.interop.formats` for the displacement), and
the ``registration.json`` record of what was registered, how, and what came of it."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike
    from crd_jax.registration.model import LoadedModel

import numpy as np

from crd_jax.data.io import Volume, save_nifti
from crd_jax.errors import InputError
from crd_jax.interop.formats import displacement_names, to_itk, write_displacement
from crd_jax.registration import compact

#: what ``register --outputs`` chooses from (``affine``: affine.txt and affine_itk.txt)
OUTPUT_KINDS = ("warped", "warped_seg", "disp", "jacobian", "inverse", "affine")
DISP_FORMATS = ("voxel", "itk", "learn2reg", "compact")
#: ``register --qc``'s figure of each pair, in the pair's folder
QC_NAME = "qc.png"


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What one registration writes: the displacement's format (``voxel``, ``itk``, ``learn2reg``,
    ``compact``), the Learn2Reg ids, ``.nii`` instead of ``.nii.gz``, the optional files (det J, the inverse,
    the affine), ``outputs``: the kinds of :data:`OUTPUT_KINDS` chosen (``None``: the default set, every
    image the options ask for) and ``qc``: ``qc.png``, the figure of the saved outputs (``register --qc``)."""

    disp_format: str = "voxel"
    pair_ids: Optional[Tuple[str, str]] = None
    uncompressed: bool = False
    jacobian: bool = False
    inverse: bool = False
    affine: bool = False
    outputs: Optional[Tuple[str, ...]] = None
    qc: bool = False

    def __post_init__(self):
        if self.outputs is not None:
            unknown = [k for k in self.outputs if k not in OUTPUT_KINDS]
            if unknown or not self.outputs:
                raise InputError("--outputs", f"{','.join(unknown) or 'nothing'}: choose from {','.join(OUTPUT_KINDS)}")
            if "affine" in self.outputs and not self.affine:
                raise InputError("--outputs", "affine is written when the affine pre-alignment runs; drop --no-affine")
        missing = [k for k in ("warped", "disp") if k not in self.kinds(True)]
        if self.qc and missing:  # the figure is drawn from the saved files, as `figure --from` draws them
            raise InputError("--qc", f"draws the saved warped image and displacement; add {' and '.join(missing)} to --outputs")

    def kinds(self, with_seg: bool) -> Tuple[str, ...]:
        """The kinds written for a pair (with a moving label map or not): ``outputs`` or the default set, plus
        ``jacobian``/``inverse`` when their flags are given; ``warped_seg`` only with a label map."""
        chosen = set(self.outputs) if self.outputs is not None else {"warped", "warped_seg", "disp", "affine"}
        chosen |= {"jacobian"} if self.jacobian else set()
        chosen |= {"inverse"} if self.inverse else set()
        chosen -= set() if with_seg else {"warped_seg"}
        chosen -= set() if self.affine else {"affine"}
        return tuple(k for k in OUTPUT_KINDS if k in chosen)

    def disp_names(self) -> List[str]:
        """The displacement's file names in this format."""
        if self.disp_format == "compact":
            return [compact.NAME]
        return displacement_names(self.disp_format, pair_ids=self.pair_ids, ext=self.ext)

    @property
    def ext(self) -> str:
        return ".nii" if self.uncompressed else ".nii.gz"

    @property
    def inverse_name(self) -> str:
        return f"inverse_disp_itk{self.ext}" if self.disp_format == "itk" else f"inverse_disp{self.ext}"

    def names(self, with_seg: bool, disp: bool = True) -> List[str]:
        """Every file one registration writes with these options (``disp=False``: without the displacement,
        which the Learn2Reg layout of ``register --pairs`` writes beside the pairs' folders)."""
        ext, kinds = self.ext, self.kinds(with_seg)
        files = {
            "warped": [f"warped{ext}"],
            "warped_seg": [f"warped_seg{ext}"],
            "disp": self.disp_names() if disp else [],
            "jacobian": [f"jacobian{ext}"],
            "inverse": [self.inverse_name],
            "affine": ["affine.txt", "affine_itk.txt"],
        }
        return [n for k in kinds for n in files[k]] + ["registration.json"] + ([QC_NAME] if self.qc else [])

    def family(self) -> List[str]:
        """Every file a registration can write into one folder, whatever its options (Learn2Reg files: this
        pair's ids only; other pairs' files in a submission folder are not this run's set)."""
        names = ["affine.txt", "affine_itk.txt", "registration.json", compact.NAME, "composite.h5", QC_NAME]
        for ext in (".nii.gz", ".nii"):
            names += [
                f"warped{ext}",
                f"warped_seg{ext}",
                f"disp{ext}",
                f"disp_itk{ext}",
                f"jacobian{ext}",
                f"inverse_disp{ext}",
                f"inverse_disp_itk{ext}",
            ]
            names += displacement_names("learn2reg", pair_ids=self.pair_ids, ext=ext)
        return names


def label_dtype(labels: np.ndarray) -> np.ndarray:
    """Label maps stored in the smallest integer type that holds them (int16 for the usual atlases)."""
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if labels.size == 0 or (labels.min() >= info.min and labels.max() <= info.max):
            return labels.astype(dtype, copy=False)
    return labels.astype(np.int64)


def stored_label_dtype(warped: np.ndarray, vol: Volume) -> np.ndarray:
    """Warped labels in the integer type the label file stored (uint8 in, uint8 out), else :func:`label_dtype`."""
    try:
        stored = np.dtype(vol.header.get_data_dtype())
    except (AttributeError, TypeError):
        stored = None
    if stored is not None and stored.kind in "iu":
        info = np.iinfo(stored)
        if warped.size == 0 or (warped.min() >= info.min and warped.max() <= info.max):
            return warped.astype(stored, copy=False)
    return label_dtype(warped)


def geometry_only(volume: Volume) -> Volume:
    """The volume with its voxels dropped (a zero-strided view of the same shape and type): what writing the
    results needs of an input, so that the inputs' memory is free before the outputs are written."""
    return dataclasses.replace(volume, data=np.broadcast_to(np.zeros((), volume.data.dtype), volume.data.shape))


def sha256(path: PathLike) -> str:
    """The file's SHA-256 (hex), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def model_identity(path: str, spec_json: str) -> Dict:
    """What names a model folder's exact version: its name, label, training stage and steps, its format, and
    the SHA-256 of every file in it (computed once per process and model)."""
    spec = json.loads(spec_json)
    folder = Path(path)
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}
    return {
        "path": str(path),
        "name": folder.name,
        "label": spec.get("label", ""),
        "stage": spec.get("stage"),
        "steps": spec.get("steps"),
        "format_version": spec.get("format_version"),
        "sha256": files,
    }


def dice_scores(warped_seg: np.ndarray, fixed_seg: np.ndarray) -> Dict:
    """Dice of every label (not 0) present in either map, and their mean: ``{"mean": m, "labels": {l: d}}``."""
    a, b = np.asarray(warped_seg).ravel(), np.asarray(fixed_seg).ravel()
    labels = np.union1d(np.unique(a), np.unique(b))
    labels = labels[labels != 0]
    scores = {}
    for label in labels:
        x, y = a == label, b == label
        total = int(x.sum()) + int(y.sum())
        scores[str(int(label))] = round(2.0 * int((x & y).sum()) / total, 6) if total else 1.0
    return {"mean": round(float(np.mean(list(scores.values()))), 6) if scores else None, "labels": scores}


def registration_record(
    loaded: LoadedModel,
    fixed_path: PathLike,
    moving_path: PathLike,
    seg_path: Optional[PathLike],
    result: Mapping[str, Any],
    notes: Sequence[str],
    seconds: float,
    options: dict,
    fixed_seg_path: Optional[PathLike] = None,
    timings: Optional[Dict] = None,
    dice: Optional[Dict] = None,
) -> dict:
    """``registration.json``: what was registered (paths and SHA-256 of the inputs), with which model (its
    files' SHA-256) and crd-jax version, how (``options``: the command's), how long each step took
    (``timings``, seconds), and what came of it: folds, notes, a warning, Dice with a fixed label map
    (``crd-jax figure --from`` reads the inputs' paths from it)."""
    import crd_jax

    where = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    inputs = {
        role: {"path": where(p), "sha256": sha256(p)}
        for role, p in (("fixed", fixed_path), ("moving", moving_path), ("moving_seg", seg_path), ("fixed_seg", fixed_seg_path))
        if p
    }
    steps = dict(result.get("timings") or {}) | dict(timings or {})
    return {
        "fixed": where(fixed_path),
        "moving": where(moving_path),
        "moving_seg": where(seg_path),
        "fixed_seg": where(fixed_seg_path),
        "inputs": inputs,
        "model": loaded.path,
        "model_label": loaded.spec.get("label", ""),
        "model_version": model_identity(str(loaded.path), json.dumps(loaded.spec, sort_keys=True, default=str)),
        "options": dict(options),
        "folds": int(result["folds"]),
        "dice": dice,
        "seconds": round(float(seconds), 3),
        "timings": {k: round(float(v), 4) for k, v in steps.items()},
        "notes": list(notes),
        "warning": result.get("warning"),
        "crd_jax": crd_jax.__version__,
    }


def write_registration(
    stage: Path,
    options: OutputOptions,
    result: dict,
    fixed: Volume,
    moving: Volume,
    record: Optional[dict] = None,
    disp_stage: Optional[Path] = None,
) -> None:
    """Writes :meth:`OutputOptions.names` into ``stage`` (an output set's staging folder, see
    :class:`crd_jax.outputs.OutputSet`) from :func:`~crd_jax.registration.pipeline.register_volumes`'s result;
    the displacement into ``disp_stage`` when given (the Learn2Reg layout's shared folder). With ``qc``, last,
    ``qc.png``: drawn from the files just written (and the inputs ``record`` names), as ``crd-jax figure --from``
    draws a saved registration, so it is part of the set that lands at once."""
    if record is not None:
        (stage / "registration.json").write_text(json.dumps(record, indent=2) + "\n")
    ext, kinds = options.ext, options.kinds("warped_seg" in result)
    if "warped" in kinds:
        save_nifti(stage / f"warped{ext}", result["warped"].astype(fixed.data.dtype, copy=False), fixed.affine, fixed.header)
    if "warped_seg" in kinds:
        save_nifti(stage / f"warped_seg{ext}", label_dtype(result["warped_seg"]), fixed.affine, None)
    if "disp" in kinds and options.disp_format == "compact":
        compact.save((disp_stage or stage) / compact.NAME, result["network_field"], fixed.affine)
    elif "disp" in kinds:
        world = (
            result["affine"].world_transform(fixed.data.shape, fixed.affine, moving.affine)  # composite.h5's affine
            if options.disp_format == "itk" and "affine" in result
            else None
        )
        write_displacement(
            disp_stage or stage, result["disp"], fixed, options.disp_format, pair_ids=options.pair_ids, ext=ext, world=world
        )
    if "jacobian" in kinds:
        save_nifti(stage / f"jacobian{ext}", result["jacobian"], fixed.affine, None)
    if "affine" in kinds:
        from crd_jax.affine_align import itk_affine_text

        world = result["affine"].world_transform(fixed.data.shape, fixed.affine, moving.affine)
        (stage / "affine.txt").write_text(
            "# fixed world (RAS, mm) -> moving world, 4x4\n"
            + "\n".join(" ".join(f"{v:.10g}" for v in row) for row in world)
            + "\n"
        )
        (stage / "affine_itk.txt").write_text(itk_affine_text(world))
    if "inverse" in kinds:
        from crd_jax.transforms import invert_fast

        inverse = invert_fast(result["disp"])
        if options.disp_format == "itk":
            inverse = to_itk(inverse, fixed.affine)
        save_nifti(stage / options.inverse_name, inverse, fixed.affine, None, intent="vector")
    if options.qc:
        from crd_jax.drawing import draw_saved

        disp_name = next(n for n in options.disp_names() if n.endswith((".nii.gz", ".nii", compact.NAME)))
        draw_saved(
            stage / QC_NAME, stage, fixed_seg_path=(record or {}).get("fixed_seg"), disp_path=(disp_stage or stage) / disp_name
        )
