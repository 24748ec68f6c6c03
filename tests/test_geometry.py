"""The model's own space: one pair stored in several orientations and voxel sizes registers to the same
warped labels in world space (issue 15, item 2)."""

import itertools

import nibabel as nib
import numpy as np
import pytest

from crd_jax.registration import space as geometry
from crd_jax.cli import main as cli
from crd_jax.data.io import Volume
from crd_jax.registration.space import onto_grid
from crd_jax.metrics import dice
from model_folders import make_model_folder

SIDE = 32  # 1 mm voxels, RAS: the model's training space


@pytest.fixture(scope="module")
def shift_model(tmp_path_factory):
    """A VM-L whose output is the constant (2, -2, 4) mm in its own RAS 1 mm space (a multiple of 2 mm, so
    that 1 mm and 2 mm grids represent the result exactly)."""
    record = {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "stored_shape": [SIDE] * 3}
    path, _, _ = make_model_folder(
        tmp_path_factory.mktemp("geom") / "shift", SIDE, bias=[1.0, -1.0, 2.0], label="shift", geometry=record
    )
    return path


def _reference():
    affine = np.eye(4)
    affine[:3, 3] = [-16.0, -16.0, -16.0]
    labels = np.zeros((SIDE,) * 3, np.int16)
    labels[6:18, 8:24, 10:20] = 1
    labels[18:28, 4:14, 14:26] = 2
    rng = np.random.default_rng(0)
    image = (labels * 0.3 + 0.1 + 0.05 * rng.random(labels.shape)).astype(np.float32)
    return Volume(image, affine), Volume(labels, affine)


def _store(volume: Volume, codes: str, spacing: int) -> Volume:
    """The same content in another orientation (axes permuted/flipped) and voxel size (2 mm: 2x2x2 blocks)."""
    data, affine = volume.data, volume.affine.copy()
    if spacing == 2:
        blocks = data.reshape(SIDE // 2, 2, SIDE // 2, 2, SIDE // 2, 2)
        data = blocks[:, 0, :, 0, :, 0] if data.dtype.kind == "i" else blocks.mean(axis=(1, 3, 5)).astype(np.float32)
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] += 0.5  # the centre of a 2 mm voxel is between two 1 mm centres
    moved, _ = geometry.to_model_space(Volume(data, affine), codes)
    return moved


VERSIONS = [("RAS", 1), ("LPS", 1), ("SRA", 1), ("LIP", 1), ("RAS", 2), ("PLS", 2)]


def test_orientations_and_voxel_sizes_give_the_same_warped_labels_in_world_space(tmp_path, shift_model, capsys):
    image, labels = _reference()
    moving_image = Volume(np.roll(image.data, 2, axis=0), image.affine)
    results = {}
    for codes, spacing in VERSIONS:
        tag = f"{codes}{spacing}"
        f, m, s = _store(image, codes, spacing), _store(moving_image, codes, spacing), _store(labels, codes, spacing)
        assert geometry.axis_codes(f.affine) == codes
        for name, vol in (("f", f), ("m", m), ("s", s)):
            nib.save(nib.Nifti1Image(vol.data, vol.affine), str(tmp_path / f"{name}_{tag}.nii.gz"))
        out = tmp_path / f"out_{tag}"
        assert (
            cli.main(
                [
                    "register",
                    "--model",
                    str(shift_model),
                    "--fixed",
                    str(tmp_path / f"f_{tag}.nii.gz"),
                    "--moving",
                    str(tmp_path / f"m_{tag}.nii.gz"),
                    "--moving-seg",
                    str(tmp_path / f"s_{tag}.nii.gz"),
                    "--out-dir",
                    str(out),
                    "--no-affine",
                ]
            )
            == 0
        )
        warped = nib.load(str(out / "warped_seg.nii.gz"))
        # every result, back on the reference RAS 1 mm grid through its own affine (world space)
        results[tag] = onto_grid(Volume(np.asarray(warped.dataobj).astype(np.int32), warped.affine), labels, order=0)
    reference_shifted = results["RAS1"]
    # the model moves content by (2, -2, 4) mm: the warped labels are the labels sampled 2, -2, 4 mm away
    assert dice(reference_shifted[:24, 4:28, :26], labels.data[2:26, 2:26, 4:30], [1, 2]).min() > 0.99
    for a, b in itertools.combinations(results, 2):
        d = dice(results[a], results[b], [1, 2])
        assert d.min() >= 0.98, (a, b, d)
