"""Fine-tuning a shipped model on a folder of one's own scans (``crd-jax finetune``; ``config.init_from`` in
train.py), run as a user runs it: the documented walkthrough in fresh processes on NIfTI files written to disk in
another orientation and voxel size than the model's, then ``crd-jax register --model`` on the result."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from crd_jax.allocator import training_runs_in_huge_pages

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


def _walkthrough():
    import re
    import shlex

    text = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"<!-- finetune-walkthrough -->\n```bash\n(.*?)```\n<!-- /finetune-walkthrough -->", text, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_finetune_walkthrough_runs_as_written_and_improves_held_back_dice(tmp_path):
    """docs/training.md's walkthrough, command for command, in fresh processes, on synthetic brains."""
    _write_subjects(tmp_path / "scans")
    commands = _walkthrough()
    assert [c[:2] for c in commands] == [["crd-jax", "finetune"], ["crd-jax", "register"]]
    for argv in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "crd_jax", *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
        if argv[1] == "finetune":  # a training command: re-executed with malloc in huge pages where supported
            assert ("malloc in transparent huge pages" in proc.stderr) == training_runs_in_huge_pages(), proc.stderr[-2000:]
    work = tmp_path / "my-model.work"
    prepared = json.loads((work / "prepared" / "prepared.json").read_text())
    assert prepared["orientation"] == "LPS" and prepared["voxel_size"] == pytest.approx([2.5, 2.4, 2.5])
    results = {r["stage"]: r for r in json.loads((work / "results.json").read_text())}
    before, after = results["pretrained"]["dice_mean"], results["finetune"]["dice_mean"]
    assert results["finetune"]["num_pairs"] == 2  # the two held-back subjects, both ways
    assert after > before + 0.005, (before, after)
    spec = json.loads((tmp_path / "my-model" / "model.json").read_text())
    assert spec["finetuned_from"]["model"] == "lpba40-vm-ll-crd" and spec["factor"] == 4
    assert spec["preprocessing"]["geometry"]["orientation"] == "LPS"
    scans = tmp_path / "scans" / "images"
    warped = nib.load(str(tmp_path / "sub-07_to_sub-06" / "warped.nii.gz"))
    assert warped.shape == nib.load(str(scans / "sub-06.nii.gz")).shape
    assert np.isfinite(np.asarray(warped.dataobj)).all()


@pytest.mark.slow
def test_finetune_refuses_bad_arguments_with_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("a user's own file")
    for args, needle in (
        (["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "m")], "is not a folder"),
        (["--images", str(tmp_path), "--out", str(tmp_path / "out")], "not a crd-jax model folder"),
        # --overwrite replaces a model folder only: a folder of anything else, or a file, stays as it is
        (["--images", str(tmp_path), "--out", str(tmp_path / "out"), "--overwrite"], "not a crd-jax model folder"),
        (["--images", str(tmp_path), "--out", str(tmp_path / "out" / "notes.txt"), "--overwrite"], "is a file"),
        (["--images", str(tmp_path), "--out", str(tmp_path / "m"), "--steps", "0"], "--steps"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "crd_jax", "finetune", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "a user's own file"


@pytest.mark.slow
def test_finetune_without_labels_trains(tmp_path):
    """--labels is optional: scans alone fine-tune (no Dice, no held-back subjects); it asked for a label set,
    failed with exit 2 naming a config field and left the prepared scans behind."""
    _write_subjects(tmp_path / "scans", count=3)
    cmd = [sys.executable, "-m", "crd_jax", "finetune", "--images", str(tmp_path / "scans" / "images")]
    cmd += ["--out", str(tmp_path / "m"), "--steps", "1", "--val-subjects", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "params.msgpack"]


def test_a_finetune_start_failing_after_the_scans_are_prepared_leaves_no_workdir(tmp_path, monkeypatch):
    """Fine-tuning's setup writes the prepared scans into the workdir before the run's other checks: a check that
    fails then (here the label set, as it did for scans without label maps) removes the workdir it created."""
    from crd_jax.errors import InputError
    from crd_jax.training import finetune, pipeline

    _write_subjects(tmp_path / "scans", count=3)
    config = finetune.default_config()
    config.init_from = "lpba40-vm-ll-crd"
    config.data.root = str(tmp_path / "scans")
    config.data.images_dir = str(tmp_path / "scans" / "images")
    config.data.labels_dir = str(tmp_path / "scans" / "labels")
    config.finetune.steps = 1
    config.workdir = str(tmp_path / "work")
    seen = []

    def failing(*args, **kwargs):
        seen.append((tmp_path / "work" / "prepared" / "prepared.json").exists())
        raise InputError("config.data.labels", "refused by the test")

    monkeypatch.setattr(pipeline, "dataset_labels", failing)
    with pytest.raises(InputError, match="refused by the test"):
        pipeline.run(config)
    assert seen == [True]  # the scans were prepared when the check failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans"]


def test_finetune_refuses_label_maps_that_do_not_match_the_scans(tmp_path):
    """--labels given, but its files named otherwise than the scans: refused naming the first scan without one (it
    trained with no Dice, no held-back subjects and no word)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(2):
        img = np.random.default_rng(i).random((24, 28, 24)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, affine), tmp_path / "images" / f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image((img > 0.5).astype(np.int16), affine), tmp_path / "labels" / f"s{i}_seg.nii.gz")
    before = sorted(p.name for p in tmp_path.iterdir())
    cmd = [sys.executable, "-m", "crd_jax", "finetune", "--images", str(tmp_path / "images")]
    cmd += ["--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "m"), "--steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "s0.nii.gz" in proc.stderr and "has no label map of the same name" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
