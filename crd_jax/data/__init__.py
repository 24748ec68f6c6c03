"""Data: NIfTI/npz I/O, dataset layouts, preprocessing, pair sampling, loading, synthetic data.

The names below are imported on first use (PEP 562): ``crd-jax register`` needs the I/O, not the dataset
machinery.
"""

import importlib

_WHERE = {
    "build_datasets": "build",
    "dataset_labels": "build",
    "VolumeDataset": "dataset",
    "Volume": "io",
    "load_image": "io",
    "load_labels": "io",
    "save_nifti": "io",
    "save_npz": "io",
    "Subject": "layouts",
    "label_protocol": "layouts",
    "list_subjects": "layouts",
    "select": "layouts",
    "PairLoader": "loader",
    "eval_pairs": "pairs",
    "train_pair": "pairs",
    "Placement": "preprocess",
    "Preprocessor": "preprocess",
    "normalize": "preprocess",
    "padded_shape": "preprocess",
    "place": "preprocess",
    "SyntheticConfig": "synthetic",
    "SyntheticDataset": "synthetic",
    "make_subject": "synthetic",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'crd_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"crd_jax.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
