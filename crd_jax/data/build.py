"""Datasets from a config (``config.data``, see ``configs/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Union

from crd_jax.data.dataset import SliceDataset, VolumeDataset
from crd_jax.data.layouts import label_protocol, list_subjects, select
from crd_jax.data.preprocess import Preprocessor
from crd_jax.data.synthetic import SyntheticConfig, SyntheticDataset
from crd_jax.errors import InputError

if TYPE_CHECKING:
    import ml_collections

SPLITS = ("train", "val", "test")


def synthetic_config(data: ml_collections.ConfigDict) -> SyntheticConfig:
    s = data.synthetic
    return SyntheticConfig(
        shape=tuple(s.shape),
        num_subjects=int(s.train + s.val + s.test),
        num_labels=int(s.num_labels),
        max_displacement=float(s.max_displacement),
        seed=int(s.seed),
    )


def preprocessor(data: ml_collections.ConfigDict, multiple: int) -> Preprocessor:
    return Preprocessor(
        normalize=data.normalize,
        percentiles=tuple(data.percentiles),
        resample_shape=tuple(data.resample_shape) or None,
        shape=tuple(data.shape) or None,
        multiple=multiple,
    )


def build_datasets(data: ml_collections.ConfigDict, multiple: int) -> Dict[str, object]:
    """``{"train": ds, "val": ds, "test": ds}``; splits that select nothing are omitted.

    ``multiple``: every canvas side must be divisible by it (``2^(levels + k)`` for the models in use).
    """
    if data.kind == "synthetic":
        cfg = synthetic_config(data)
        if any(s % multiple for s in cfg.shape):
            raise InputError("config.data.synthetic.shape", f"{cfg.shape} is not divisible by {multiple}")
        counts = {k: int(data.synthetic[k]) for k in SPLITS}
        out, offset = {}, 0
        for split in SPLITS:
            if counts[split] > 0:
                out[split] = SyntheticDataset(cfg, offset, counts[split])
            offset += counts[split]
        return out
    if not data.root:
        raise InputError("config.data.root", f"no data root given for the '{data.kind}' layout (try configs/synthetic_vm.py)")
    kwargs = {"images": data.images_dir, "labels": data.labels_dir} if data.kind == "folder" else {}
    subjects = list_subjects(data.kind, data.root, **kwargs)
    pre = preprocessor(data, multiple)
    slicing = int(data.get("slice_axis", -1)) >= 0
    out = {}
    for split in SPLITS:
        spec = data.splits.get(split, "")
        if spec in (None, "", "none"):
            continue
        ndim = 3 if slicing else int(data.ndim)
        ds = VolumeDataset(select(subjects, spec), pre, ndim=ndim, cache_size=int(data.cache_size))
        if slicing:  # a 2-D dataset of the same slices of every subject
            ds = SliceDataset(ds, int(data.slice_axis), *map(int, data.slice_range))
        out[split] = ds
    return out


def dataset_labels(
    data: ml_collections.ConfigDict, dataset: Optional[Union[VolumeDataset, SliceDataset, SyntheticDataset]] = None
) -> List[int]:
    """The label set a Dice average runs over (``config.data.labels``): a protocol name, a list, ``"auto"``
    (every nonzero label of the dataset's first label map) or ``"none"`` (scans without label maps: no Dice)."""
    if data.kind == "synthetic":
        return list(range(1, int(data.synthetic.num_labels) + 1))
    if data.labels == "none":
        return []
    if data.labels == "auto":
        if dataset is None or not dataset.has_labels:
            raise InputError("config.data.labels", "'auto' needs a split with label maps")
        import numpy as np

        return [int(v) for v in np.unique(dataset.labels(0)) if v != 0]
    return label_protocol(data.labels if isinstance(data.labels, str) else list(data.labels))
