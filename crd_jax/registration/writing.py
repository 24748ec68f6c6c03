"""Writing a registration: the set of files one pair produces (named before anything is computed, so that a
refusal leaves nothing), in the project's formats (:mod:`crd_jax.interop.formats` for the displacement), and
the ``registration.json`` record of what was registered, how, and what came of it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from crd_jax.data.io import Volume, save_nifti
from crd_jax.interop.formats import displacement_names, to_itk, write_displacement


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What one registration writes: the displacement's format (``voxel``, ``itk``, ``learn2reg``), the
    Learn2Reg ids, ``.nii`` instead of ``.nii.gz``, and the optional files (det J, the inverse, the affine)."""

    disp_format: str = "voxel"
    pair_ids: Optional[Tuple[str, str]] = None
    uncompressed: bool = False
    jacobian: bool = False
    inverse: bool = False
    affine: bool = False

    @property
    def ext(self) -> str:
        return ".nii" if self.uncompressed else ".nii.gz"

    @property
    def inverse_name(self) -> str:
        return f"inverse_disp_itk{self.ext}" if self.disp_format == "itk" else f"inverse_disp{self.ext}"

    def names(self, with_seg: bool) -> List[str]:
        """Every file one registration writes with these options."""
        ext = self.ext
        names = [f"warped{ext}"] + ([f"warped_seg{ext}"] if with_seg else [])
        names += displacement_names(self.disp_format, pair_ids=self.pair_ids, ext=ext)
        names += ["affine.txt", "affine_itk.txt"] if self.affine else []
        names += ([f"jacobian{ext}"] if self.jacobian else []) + ([self.inverse_name] if self.inverse else [])
        return names + ["registration.json"]

    def family(self) -> List[str]:
        """Every file a registration can write into one folder, whatever its options (Learn2Reg files: this
        pair's ids only; other pairs' files in a submission folder are not this run's set)."""
        names = ["affine.txt", "affine_itk.txt", "registration.json"]
        for ext in (".nii.gz", ".nii"):
            names += [f"warped{ext}", f"warped_seg{ext}", f"disp{ext}", f"disp_itk{ext}", f"jacobian{ext}",
                      f"inverse_disp{ext}", f"inverse_disp_itk{ext}"]
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


def registration_record(loaded, fixed_path, moving_path, seg_path, result, notes, seconds, options: dict) -> dict:
    """``registration.json``: what was registered, how (``options``: the command's), and what came of it
    (``crd-jax figure --from`` reads the inputs' paths from it)."""
    import crd_jax

    where = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    return {"fixed": where(fixed_path), "moving": where(moving_path), "moving_seg": where(seg_path),
            "model": loaded.path, "model_label": loaded.spec.get("label", ""), "options": dict(options),
            "folds": int(result["folds"]), "seconds": round(float(seconds), 3), "notes": list(notes),
            "warning": result.get("warning"), "crd_jax": crd_jax.__version__}


def write_registration(stage: Path, options: OutputOptions, result: dict, fixed: Volume, moving: Volume,
                       record: Optional[dict] = None) -> None:
    """Writes :meth:`OutputOptions.names` into ``stage`` (an output set's staging folder, see
    :class:`crd_jax.outputs.OutputSet`) from :func:`~crd_jax.registration.pipeline.register_volumes`'s result."""
    if record is not None:
        (stage / "registration.json").write_text(json.dumps(record, indent=2) + "\n")
    ext = options.ext
    save_nifti(stage / f"warped{ext}", result["warped"].astype(fixed.data.dtype, copy=False), fixed.affine, fixed.header)
    if "warped_seg" in result:
        save_nifti(stage / f"warped_seg{ext}", label_dtype(result["warped_seg"]), fixed.affine, None)
    write_displacement(stage, result["disp"], fixed, options.disp_format, pair_ids=options.pair_ids, ext=ext)
    if options.jacobian:
        save_nifti(stage / f"jacobian{ext}", result["jacobian"], fixed.affine, None)
    if options.affine:
        from crd_jax.affine_align import itk_affine_text

        world = result["affine"].world_transform(fixed.data.shape, fixed.affine, moving.affine)
        (stage / "affine.txt").write_text("# fixed world (RAS, mm) -> moving world, 4x4\n" + "\n".join(
            " ".join(f"{v:.10g}" for v in row) for row in world) + "\n")
        (stage / "affine_itk.txt").write_text(itk_affine_text(world))
    if options.inverse:
        from crd_jax.transforms import invert_fast

        inverse = invert_fast(result["disp"])
        if options.disp_format == "itk":
            inverse = to_itk(inverse, fixed.affine)
        save_nifti(stage / options.inverse_name, inverse, fixed.affine, None, intent="vector")
