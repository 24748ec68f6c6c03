"""``apply --interpolation onehot`` on the device (crd_jax/onehot.py) against the SciPy loop over labels
(crd_jax.transforms.apply_to_labels), and the label file's integer type kept."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax import transforms
from crd_jax.onehot import warp_labels_onehot


def _labels(shape, dtype, values, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.choice(np.asarray(values), size=(5, 6, 5))
    return ndimage.zoom(coarse, np.asarray(shape) / np.asarray(coarse.shape), order=0).astype(dtype)


def _field(shape, scale, seed=1):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(0, 1, (*shape, 3)), (3, 3, 3, 0)) * scale


@pytest.mark.parametrize(
    "dtype, values",
    [
        (np.uint8, [0, 1, 2, 5, 9, 200]),
        (np.int16, [0, -3, 4, 1000, 7]),
        (np.int32, [0, 1, 2, 3]),
        (np.int64, [0, 2**40, -(2**35), 11]),
    ],
)
def test_onehot_on_the_device_equals_the_scipy_loop(dtype, values):
    shape = (19, 22, 17)
    labels = _labels(shape, dtype, values)
    disp = _field(shape, 12.0)  # displacements of a few voxels, reaching past the edges
    image_affine = np.diag([1.1, 0.9, 1.0, 1.0])
    image_affine[:3, 3] = [1.0, -2.0, 0.5]
    reference_affine = np.diag([1.2, 1.0, 0.9, 1.0])
    reference = transforms.apply_to_labels(labels, image_affine, disp, reference_affine, "onehot")
    got = warp_labels_onehot(labels, transforms.sample_coordinates(disp, reference_affine, image_affine))
    assert got.dtype == labels.dtype and got.shape == shape
    np.testing.assert_array_equal(got, reference)


def test_onehot_ties_go_to_the_background_then_the_smaller_label():
    # a sample exactly half-way between two labels' voxels (weights 0.5 / 0.5)
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1] = 7
    labels[2] = 3
    disp = np.zeros((4, 4, 4, 3))
    disp[..., 0] = 0.5
    got = warp_labels_onehot(labels, transforms.sample_coordinates(disp, np.eye(4), np.eye(4)))
    assert got[1, 1, 1] == 3  # 7 | 3: the smaller value
    assert got[0, 1, 1] == 0  # 0 | 7: background
    np.testing.assert_array_equal(got, transforms.apply_to_labels(labels, np.eye(4), disp, np.eye(4), "onehot"))


def test_apply_onehot_in_a_fresh_process_keeps_the_label_type(tmp_path):
    shape = (24, 20, 18)
    affine = np.diag([1.0, 1.0, 1.2, 1.0])
    for dtype in (np.uint8, np.int16):
        labels = _labels(shape, dtype, [0, 1, 2, 3, 40])
        nib.save(nib.Nifti1Image(labels, affine), tmp_path / f"labels_{np.dtype(dtype).name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), tmp_path / "fixed.nii.gz")
    disp = _field(shape, 10.0).astype(np.float32)
    nib.save(nib.Nifti1Image(disp, affine), tmp_path / "disp.nii.gz")
    for dtype in (np.uint8, np.int16):
        name = np.dtype(dtype).name
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "crd_jax",
                "apply",
                "--disp",
                "disp.nii.gz",
                "--reference",
                "fixed.nii.gz",
                "--image",
                f"labels_{name}.nii.gz",
                "--labels",
                "--interpolation",
                "onehot",
                "--out",
                f"out_{name}.nii.gz",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "(reading, warping and writing)" in proc.stdout
        out = nib.load(tmp_path / f"out_{name}.nii.gz")
        assert out.get_data_dtype() == np.dtype(dtype), (name, out.get_data_dtype())
        labels = np.asarray(nib.load(tmp_path / f"labels_{name}.nii.gz").dataobj)
        reference = transforms.apply_to_labels(
            labels, affine, np.asarray(nib.load(tmp_path / "disp.nii.gz").dataobj), affine, "onehot"
        )
        np.testing.assert_array_equal(np.asarray(out.dataobj), reference)
