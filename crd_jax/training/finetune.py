"""Fine-tuning a finished model (a shipped one, or any model folder) on a folder of the user's own scans.

``config.init_from`` names the model (``lpba40-vm-ll-crd``, or a folder). :func:`setup` then

1. maps every image of ``config.data.root`` (``images/``, and ``labels/`` when present) into the model's own
   space, exactly as ``crd-jax register`` maps its inputs: axes permuted/flipped to the model's orientation,
   resampled (linear; labels nearest) to the model's voxel size, normalised as the model was; every subject is
   centred on one common grid (the largest field of view; zero outside) and written under
   ``workdir/prepared/`` (cached: prepared once per run folder);
2. turns the config into a two-stage run: ``pretrained`` (the model as it is, loaded, not trained; evaluated
   on the held-back subjects when labels exist) and ``finetune`` (the model's own architecture and resolution,
   initialised from it, ``config.finetune.steps`` steps of L_sim + lambda L_reg, eq. 3/5);
3. makes the exported model keep the source model's input preprocessing, so that ``crd-jax register --model
   WORKDIR/stages/finetune/model`` maps new inputs as the training data were mapped.

Subjects must be roughly aligned to each other (as the shipped models' training data were: affinely), or be
registered with ``--affine`` first. With labels, the last ``config.finetune.val_subjects`` subjects are held
back and both models' validation Dice are reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np

from crd_jax.errors import InputError

if TYPE_CHECKING:
    import ml_collections

PREPARED = "prepared"


def default_config() -> ml_collections.ConfigDict:
    """The fine-tuning run's config (``configs/finetune.py`` and ``crd-jax finetune`` start from it)."""
    from crd_jax.config import base_config

    c = base_config()
    c.name = "Fine-tuning"
    c.workdir = "runs/finetune"
    c.init_from = "lpba40-vm-ll-crd"
    c.data.kind = "folder"
    c.data.root = ""  # required: the folder of scans
    c.data.labels = "auto"
    c.finetune.steps = 1000
    c.finetune.val_subjects = 2
    c.train.batch_size = 1
    c.train.lr = 1e-4  # a tenth of the shipped models' training rate: adapt, do not retrain
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.eval.val_pairs = 2
    c.eval.hd95 = False
    c.eval.timing_repeats = 1
    c.eval.diagnostics = False
    return c


def _source(init_from: str) -> Tuple[Path, Dict]:
    from crd_jax.model_io import load_spec
    from crd_jax.pretrained import resolve

    folder = resolve(init_from)
    if not folder.is_dir():
        raise InputError(init_from, "no such model folder or shipped model (crd-jax models lists them)")
    spec = load_spec(folder)
    if spec.get("kind") != "registrar":
        raise InputError(folder, "fine-tuning needs a registration model (a registrar), not a teacher")
    return folder, spec


def _model_space(spec: Dict) -> Tuple[str, Tuple[float, ...], Dict]:
    from crd_jax.registration.space import model_voxel_size

    pre = spec.get("preprocessing", {})
    record = pre.get("geometry")
    if not record:
        raise InputError(
            "config.init_from",
            "the model records no training orientation/voxel size "
            "(preprocessing.geometry); it cannot map new scans into its space",
        )
    return record["orientation"], model_voxel_size(record, pre), pre


def _centre(data: np.ndarray, shape, fill=0):
    out = np.full(shape, fill, dtype=data.dtype)
    src, dst = [], []
    for s, t in zip(data.shape, shape):
        lo = (t - s) // 2
        src.append(slice(max(0, -lo), max(0, -lo) + min(s, t)))
        dst.append(slice(max(0, lo), max(0, lo) + min(s, t)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def prepare_folder(root: Path, spec: Dict, dest: Path, images_dir: str = "images", labels_dir: str = "labels") -> Dict:
    """Every subject of ``root`` in the model's space under ``dest`` (``images/``, ``labels/``); returns a
    record of what was done. Idempotent: a finished ``dest`` (its ``prepared.json``) is reused."""
    from crd_jax.data.io import load_image, load_labels, save_nifti
    from crd_jax.data.layouts import list_subjects
    from crd_jax.data.preprocess import apply_normalize, normalize_params, resample
    from crd_jax.registration.space import model_work_shape, to_model_space

    done = dest / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    orientation, voxel, pre = _model_space(spec)
    subjects = list_subjects("folder", root, images=images_dir, labels=labels_dir)
    if len(subjects) < 2:
        raise InputError(root, f"fine-tuning needs at least two subjects in {images_dir}/, found {len(subjects)}")
    labels_folder = Path(root) / labels_dir  # an absolute labels_dir stays itself
    unlabelled = [s for s in subjects if s.labels is None]
    if labels_folder.is_dir() and unlabelled:  # label maps asked for, but not every scan has its own
        raise InputError(
            unlabelled[0].image,
            f"has no label map of the same name in {labels_folder} ({len(unlabelled)} of {len(subjects)} scans lack one)",
        )
    mode, percentiles = pre.get("normalize", "none"), pre.get("percentiles", [0.5, 99.5])
    mapped: List[Tuple[str, np.ndarray, object]] = []
    for s in subjects:
        image, _ = to_model_space(load_image(s.image, 3), orientation)
        work = model_work_shape(image, voxel)
        data = resample(np.ascontiguousarray(image.data), work, 1)
        data = apply_normalize(data, normalize_params(image.data, mode, *percentiles))
        seg = None
        if s.labels is not None:
            labels, _ = to_model_space(load_labels(s.labels, 3), orientation)
            if labels.data.shape != image.data.shape:
                raise InputError(s.labels, f"label map shape {labels.data.shape} differs from its image's {image.data.shape}")
            seg = resample(np.ascontiguousarray(labels.data), work, 0)
        mapped.append((s.id, data.astype(np.float32), seg))
    common = tuple(int(max(m[1].shape[i] for m in mapped)) for i in range(3))
    # the common grid's geometry: the model's orientation and voxel size (what the exported model records)
    axes = np.eye(4)
    signs = {"L": -1, "R": 1, "P": -1, "A": 1, "I": -1, "S": 1}
    order = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    for i, code in enumerate(orientation):
        axes[:3, i] = 0
        axes[order[code], i] = signs[code] * voxel[i]
    for sid, data, seg in mapped:
        save_nifti(dest / "images" / f"{sid}.nii.gz", _centre(data, common), axes)
        if seg is not None:
            save_nifti(dest / "labels" / f"{sid}.nii.gz", _centre(seg.astype(np.int32), common), axes)
    record = {
        "subjects": [m[0] for m in mapped],
        "shape": list(common),
        "voxel_size": list(voxel),
        "orientation": orientation,
        "normalize": mode,
        "labels": all(m[2] is not None for m in mapped),
        "source": str(root),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def setup(config: ml_collections.ConfigDict) -> Dict:
    """Rewrites a config with ``init_from`` set into the fine-tuning run (see the module docstring); returns
    the source model's spec. Idempotent, so a resumed run sees the same config."""
    import ml_collections

    from crd_jax.config import stage
    from crd_jax.data.preprocess import padded_shape
    from crd_jax.registration.model import canvas_multiple
    from crd_jax.models.build import spec_architecture

    folder, spec = _source(str(config.init_from))
    if not config.data.root:
        raise InputError("config.data.root", "the folder of scans to fine-tune on (images/ and, optionally, labels/)")
    workdir = Path(config.workdir).absolute()
    record = prepare_folder(Path(config.data.root), spec, workdir / PREPARED, config.data.images_dir, config.data.labels_dir)
    n = len(record["subjects"])
    val = int(config.finetune.val_subjects) if record["labels"] else 0
    if val and n - val < 2:
        val = 0
    factor = int(spec["factor"])
    with config.unlocked():
        config.data.kind = "folder"
        config.data.root = str(workdir / PREPARED)
        config.data.images_dir, config.data.labels_dir = "images", "labels"
        config.data.normalize = "none"  # prepared data are normalised already
        config.data.resample_shape = ()
        config.data.shape = tuple(padded_shape(record["shape"], canvas_multiple(spec)))
        config.data.labels = "auto" if record["labels"] else "none"  # no label maps: no Dice, no held-back subjects
        config.data.splits = ml_collections.ConfigDict(
            {"train": f"0:{n - val}", "val": f"{n - val}:{n}" if val else "", "test": ""}
        )
        config.eval.split = "val"
        for key, value in spec_architecture(spec).items():
            config.model[key] = value
        config.model.shift = factor.bit_length() - 1
        config.stages = ml_collections.ConfigDict()
        config.stages.pretrained = stage("pretrained", path=str(folder), evaluate=bool(val), label=f"{folder.name} (as shipped)")
        config.stages.finetune = stage(
            "baseline",
            resolution="low" if factor > 1 else "high",
            init="pretrained",
            steps=int(config.finetune.steps),
            evaluate=bool(val),
            label=f"{folder.name} fine-tuned",
        )
        config.pipeline = ("pretrained", "finetune")
        config.eval.val_pairs = min(int(config.eval.val_pairs), val * (val - 1)) if val else 0
    return spec


def exported_preprocessing(config: ml_collections.ConfigDict, computed: Dict) -> Dict:
    """The fine-tuned model's ``preprocessing``: as computed from the prepared data (their geometry, canvas and
    intensities after normalisation), with the source model's normalisation, which new inputs still need."""
    _, spec = _source(str(config.init_from))
    source = spec.get("preprocessing", {})
    return dict(computed, normalize=source.get("normalize", "none"), percentiles=source.get("percentiles", [0.5, 99.5]))
