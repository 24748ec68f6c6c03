"""Data: NIfTI/npz I/O, dataset layouts, preprocessing, pair sampling, loading, synthetic data."""

from crd_jax.data.build import build_datasets, dataset_labels
from crd_jax.data.dataset import VolumeDataset
from crd_jax.data.io import Volume, load_image, load_labels, save_nifti, save_npz
from crd_jax.data.layouts import Subject, label_protocol, list_subjects, select
from crd_jax.data.loader import PairLoader
from crd_jax.data.pairs import eval_pairs, train_pair
from crd_jax.data.preprocess import Placement, Preprocessor, normalize, padded_shape, place
from crd_jax.data.synthetic import SyntheticConfig, SyntheticDataset, make_subject

__all__ = [
    "build_datasets",
    "dataset_labels",
    "VolumeDataset",
    "Volume",
    "load_image",
    "load_labels",
    "save_nifti",
    "save_npz",
    "Subject",
    "label_protocol",
    "list_subjects",
    "select",
    "PairLoader",
    "eval_pairs",
    "train_pair",
    "Placement",
    "Preprocessor",
    "normalize",
    "padded_shape",
    "place",
    "SyntheticConfig",
    "SyntheticDataset",
    "make_subject",
]
