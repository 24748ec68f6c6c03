"""Shipped models by name: resolution, the default, the listing, and `crd-jax register --model NAME`."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax import pretrained
from crd_jax.cli import main as cli
from crd_jax.errors import InputError
from model_folders import make_model_folder


def _ship(root, name, label):
    make_model_folder(root / name, label=label)
    spec_path = root / name / "model.json"
    import json

    spec = json.loads(spec_path.read_text())
    spec["shipped"] = {
        "trained_on": "test data",
        "grid": [32, 32, 32],
        "voxel_size_mm": [1, 1, 1],
        "orientation": "RAS",
        "val_dice_grid": 0.5,
        "val_dice_1mm": 0.6,
        "validated_on": "nothing",
    }
    spec_path.write_text(json.dumps(spec))


def test_resolve_names_paths_and_the_default(tmp_path):
    assert pretrained.shipped(tmp_path) == {}
    with pytest.raises(InputError, match="ships none"):
        pretrained.resolve(None, tmp_path)
    _ship(tmp_path, "lpba40-vm-h", "VM-H")
    assert pretrained.default_model(tmp_path) is None  # only a VM-LL-CRD is a default
    _ship(tmp_path, "lpba40-vm-ll-crd", "VM-LL-CRD")
    assert pretrained.default_model(tmp_path) == "lpba40-vm-ll-crd"
    assert pretrained.resolve(None, tmp_path) == tmp_path / "lpba40-vm-ll-crd"
    assert pretrained.resolve("lpba40-vm-h", tmp_path) == tmp_path / "lpba40-vm-h"
    assert pretrained.resolve(str(tmp_path / "lpba40-vm-h"), tmp_path) == tmp_path / "lpba40-vm-h"
    with pytest.raises(InputError, match="shipped: lpba40-vm-h, lpba40-vm-ll-crd"):
        pretrained.resolve("lpba40-vm-x", tmp_path)
    rows = pretrained.listing(tmp_path)
    assert [r["name"] for r in rows] == ["lpba40-vm-h", "lpba40-vm-ll-crd"] and rows[1]["val_dice_1mm"] == 0.6


def test_register_and_models_commands_use_shipped_names(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    _ship(shipped, "lpba40-vm-ll-crd", "VM-LL-CRD")
    monkeypatch.setattr(pretrained, "HERE", shipped)
    rng = np.random.default_rng(0)
    for i in range(2):
        v = ndimage.gaussian_filter(rng.random((32, 32, 32)), 2).astype(np.float32)
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / f"{i}.nii.gz"))
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lpba40-vm-ll-crd (default): VM-LL-CRD" in out and "0.6 (1 mm)" in out
    assert (
        cli.main(
            [
                "register",
                "--fixed",
                str(tmp_path / "0.nii.gz"),
                "--moving",
                str(tmp_path / "1.nii.gz"),
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert "with VM-LL-CRD" in capsys.readouterr().out
    assert (tmp_path / "out" / "warped.nii.gz").exists()
