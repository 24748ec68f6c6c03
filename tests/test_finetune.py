"""Fine-tuning a shipped model on a folder of one's own scans (``config.init_from``, configs/finetune.py), run as
a user runs it: ``train.py`` in a fresh process on NIfTI files written to disk in another orientation and voxel
size than the model's, then ``crd-jax register --model`` on the result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _write_subjects(root: Path, count: int = 8):
    """Synthetic brains stored RAS at 1.2 mm (the shipped models: LPS at 2.5 x 2.4 x 2.5 mm)."""
    from scipy import ndimage

    from crd_jax.data import SyntheticConfig, make_subject

    cfg = SyntheticConfig(shape=(80, 96, 80), max_displacement=4.0)
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        img, seg = make_subject(cfg, i)
        img = ndimage.zoom(img, 1 / 1.2, order=1)
        seg = ndimage.zoom(seg, 1 / 1.2, order=0)
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), root / "images" / f"sub-{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(seg.astype(np.int16), affine), root / "labels" / f"sub-{i:02d}.nii.gz")
    return cfg


@pytest.mark.slow
def test_finetuning_a_shipped_model_improves_held_back_dice_and_register_takes_the_result(tmp_path):
    _write_subjects(tmp_path / "scans")
    work = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'finetune.py'}",
           "--config.init_from=lpba40-vm-ll-crd", f"--config.data.root={tmp_path / 'scans'}", f"--config.workdir={work}",
           "--config.finetune.steps=60", "--config.train.lr=1e-3", "--config.train.progress_bar=False",
           "--config.train.eval_every=0"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepared = json.loads((work / "prepared" / "prepared.json").read_text())
    assert prepared["orientation"] == "LPS" and prepared["voxel_size"] == pytest.approx([2.5, 2.4, 2.5])
    results = {r["stage"]: r for r in json.loads((work / "results.json").read_text())}
    before, after = results["pretrained"]["dice_mean"], results["finetune"]["dice_mean"]
    assert results["finetune"]["num_pairs"] == 2  # the two held-back subjects, both ways
    assert after > before + 0.005, (before, after)
    model = work / "stages" / "finetune" / "model"
    spec = json.loads((model / "model.json").read_text())
    assert spec["finetuned_from"]["model"] == "lpba40-vm-ll-crd" and spec["factor"] == 4
    assert spec["preprocessing"]["geometry"]["orientation"] == "LPS"
    # the fine-tuned model registers new scans in their own space, as a shipped one does
    scans = tmp_path / "scans" / "images"
    out = tmp_path / "reg"
    reg = subprocess.run([sys.executable, "-m", "crd_jax", "register", "--model", str(model), "--fixed",
                          str(scans / "sub-06.nii.gz"), "--moving", str(scans / "sub-07.nii.gz"), "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert reg.returncode == 0, reg.stderr[-2000:]
    warped = nib.load(str(out / "warped.nii.gz"))
    assert warped.shape == nib.load(str(scans / "sub-06.nii.gz")).shape
    assert np.isfinite(np.asarray(warped.dataobj)).all()
