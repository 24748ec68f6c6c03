"""Dataset layouts: each lists subjects ``(id, image_path, label_path | None)`` under a root folder.

* ``neurite_oasis``: ``ROOT/OASIS_OAS1_XXXX_MR1/aligned_norm.nii.gz`` + ``aligned_seg35.nii.gz``.
* ``learn2reg_oasis``: ``ROOT/imagesTr/OASIS_XXXX_0000.nii.gz`` + ``ROOT/labelsTr/OASIS_XXXX_0000.nii.gz``
  (the subject list of ``OASIS_dataset.json`` when present).
* ``folder``: ``ROOT/images/*.nii.gz`` and ``ROOT/labels/*.nii.gz`` matched by file name (LPBA40 as shipped in
  ``shared/data/lpba40``, Mindboggle-101, SLIVER, or any set of ``.npz`` files with ``vol``/``seg``).

Splits (:func:`select`) and label protocols (:func:`label_protocol`) are config values.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from crd_jax.errors import InputError

_PROTOCOLS = Path(__file__).with_name("protocols")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".npz")


@dataclasses.dataclass(frozen=True)
class Subject:
    id: str
    image: str
    labels: Optional[str] = None


def _require_dir(path: Path) -> Path:
    if not path.exists():
        raise InputError(path, "no such folder")
    if not path.is_dir():
        raise InputError(path, "is not a folder")
    return path


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nonempty(subjects: List[Subject], root: Path, expected: str) -> List[Subject]:
    if not subjects:
        raise InputError(root, f"empty dataset: no images found (expected {expected})")
    return subjects


def neurite_oasis(
    root: Union[str, Path], image_name: str = "aligned_norm.nii.gz", label_name: str = "aligned_seg35.nii.gz"
) -> List[Subject]:
    """Neurite-OASIS (Hoopes et al.): one folder per subject, sorted by subject id."""
    root = _require_dir(Path(root))
    subjects = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("OASIS_OAS1_")):
        image = d / image_name
        if image.exists():
            labels = d / label_name
            subjects.append(Subject(d.name, str(image), str(labels) if labels.exists() else None))
    return _nonempty(subjects, root, f"OASIS_OAS1_*/{image_name}")


def learn2reg_oasis(root: Union[str, Path]) -> List[Subject]:
    """Learn2Reg 2021 task 3 / OASIS: ``imagesTr`` + ``labelsTr``, or the list in ``OASIS_dataset.json``."""
    root = _require_dir(Path(root))
    manifest = root / "OASIS_dataset.json"
    entries = []
    if manifest.exists():
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(manifest, f"unreadable JSON ({exc})") from None
        for item in info.get("training", []):
            image = root / str(item["image"]).lstrip("./")
            label = item.get("label")
            entries.append((image, root / str(label).lstrip("./") if label else None))
    else:
        images_dir = _require_dir(root / "imagesTr")
        for image in sorted(images_dir.glob("OASIS_*_0000.nii.gz")):
            entries.append((image, root / "labelsTr" / image.name))
    subjects = []
    for image, label in entries:
        sid = re.sub(r"_0000$", "", _stem(image))
        subjects.append(Subject(sid, str(image), str(label) if label is not None and label.exists() else None))
    return _nonempty(subjects, root, "imagesTr/OASIS_XXXX_0000.nii.gz")


def folder(root: Union[str, Path], images: str = "images", labels: str = "labels") -> List[Subject]:
    """``ROOT/images/<name>`` with optional ``ROOT/labels/<name>`` (same file name), sorted by name."""
    root = _require_dir(Path(root))
    images_dir = _require_dir(root / images)
    labels_dir = root / labels
    subjects = []
    for image in sorted(p for p in images_dir.iterdir() if p.name.endswith(_IMAGE_SUFFIXES)):
        label = labels_dir / image.name
        subjects.append(Subject(_stem(image), str(image), str(label) if label.exists() else None))
    return _nonempty(subjects, root, f"{images}/*.nii.gz")


LAYOUTS: Dict[str, Callable[..., List[Subject]]] = {
    "neurite_oasis": neurite_oasis,
    "learn2reg_oasis": learn2reg_oasis,
    "folder": folder,
}


def list_subjects(layout: str, root: Union[str, Path], **kwargs: Any) -> List[Subject]:
    if layout not in LAYOUTS:
        raise InputError(layout, f"unknown dataset layout (choose from {sorted(LAYOUTS)})")
    return LAYOUTS[layout](root, **kwargs)


def select(subjects: Sequence[Subject], spec: Union[str, Sequence[str], None]) -> List[Subject]:
    """A split of the (sorted) subject list.

    ``spec``: ``"a:b"`` (a Python slice, e.g. ``"0:380"``; negatives allowed, ``"-20:"``), a list of ids or a
    comma-separated string of ids (``"S35,S36"``), or ``None``/``""``/``":"`` for all subjects.
    """
    subjects = list(subjects)
    if spec is None or spec == "" or spec == ":":
        return subjects
    if isinstance(spec, str) and re.fullmatch(r"-?\d*:-?\d*", spec.strip()):
        lo, hi = (int(v) if v else None for v in spec.strip().split(":"))
        chosen = subjects[lo:hi]
    else:
        ids = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
        by_id = {s.id: s for s in subjects}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(str(spec), f"unknown subject ids {missing[:5]}")
        chosen = [by_id[i] for i in ids]
    if not chosen:
        raise InputError(str(spec), f"split selects no subjects out of {len(subjects)}")
    return chosen


def label_protocol(name_or_labels: Union[str, Sequence[int]]) -> List[int]:
    """The structures a Dice average runs over: a protocol name (``oasis35``, ``lpba40``) or a list."""
    if not isinstance(name_or_labels, str):
        return [int(v) for v in name_or_labels]
    path = _PROTOCOLS / f"{name_or_labels}.json"
    if not path.exists():
        known = sorted(p.stem for p in _PROTOCOLS.glob("*.json"))
        raise InputError(name_or_labels, f"unknown label protocol (known: {known}, or give a list)")
    return [int(v) for v in json.loads(path.read_text())["labels"]]
