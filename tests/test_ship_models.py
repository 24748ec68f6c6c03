"""benchmarks/ship_models.py, as a maintainer runs it (a fresh process) on a run folder of the experiments' layout:
the stream-0 student and its control become named model folders with their cards; nothing is replaced without
--overwrite."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from benchmark_runs import ROOT
from model_folders import make_model_folder


def _run_folder(tmp_path, stages):
    data = tmp_path / "data" / "images"
    data.mkdir(parents=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS, as LPBA40
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 40), np.float32), affine), data / "S11.nii.gz")
    run = tmp_path / "run"
    run.mkdir()
    config = {"data": {"root": str(tmp_path / "data"), "resample_shape": [32, 32, 32], "shape": [32, 32, 32]}}
    (run / "config.json").write_text(json.dumps(config))
    for i, stage in enumerate(stages):
        folder = run / "stages" / stage
        folder.mkdir(parents=True)
        make_model_folder(folder / "model", side=32)
        (folder / "eval.json").write_text(json.dumps({"dice_mean": 0.6 + 0.01 * i, "num_pairs": 30}))
    return run


def _ship(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ship_models.py"), *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "flag, names, text",
    [
        ("--experiment1", ("lpba40-vm-ll-crd", "lpba40-vm-ll-control"), "Experiment 1"),
        ("--experiment2", ("lpba40-vm-l-crd", "lpba40-vm-l-control"), "Experiment 2"),
    ],
)
def test_an_experiments_stream_0_pair_is_shipped_with_its_cards(tmp_path, flag, names, text):
    teachers = ["vm_h", "vm_l"] if flag == "--experiment2" else []  # Experiment 2 ships its finished baselines too
    run = _run_folder(tmp_path, ["crd_paper_s0", "ctl_s0", "crd_code_s0", *teachers])
    for stage in teachers:  # as the pipeline saves them: the steps they trained
        path = run / "stages" / stage / "model" / "model.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), steps=10_000)))
    dest = tmp_path / "pretrained"
    proc = _ship(flag, "--workdir", str(run), "--dest", str(dest))
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = ["lpba40-vm-h-128", "lpba40-vm-l"] if teachers else []
    assert sorted(p.name for p in dest.iterdir()) == sorted([*names, *extra])  # stream 0 of two arms, not the authors'
    if teachers:
        _restores_a_lost_run_folder(tmp_path, dest)
    cards = [json.loads((dest / n / "model.json").read_text())["shipped"] for n in names]
    for card, dice in zip(cards, (0.6, 0.61)):
        assert text in card["recipe"] and card["val_dice_grid"] == dice
        assert card["orientation"] == "LPS" and card["validated_on"].startswith("LPBA40 S35-S40, 30 ordered pairs")
    assert "step-matched control" in cards[1]["recipe"]
    # again without --overwrite, the run's models now different (another evaluation): one line, exit 2, the
    # shipped folders untouched (the same models again are skipped: test_experiment_2_ships_each_baseline_...)
    before = {n: (dest / n / "params.msgpack").read_bytes() for n in names}
    (run / "stages" / "crd_paper_s0" / "eval.json").write_text(json.dumps({"dice_mean": 0.5, "num_pairs": 30}))
    again = _ship(flag, "--workdir", str(run), "--dest", str(dest))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "--overwrite" in again.stderr
    assert {n: (dest / n / "params.msgpack").read_bytes() for n in names} == before


def test_experiment_2_ships_each_baseline_as_it_finishes(tmp_path):
    """Shipping after each stage: the second run finds the first stage shipped with the same card and goes on."""
    run = _run_folder(tmp_path, ["vm_h"])
    dest = tmp_path / "pretrained"
    first = _ship("--experiment2", "--workdir", str(run), "--dest", str(dest), "--stages", "vm_h", "vm_l")
    assert first.returncode == 0 and "vm_l: not finished, skipped" in first.stdout, first.stderr[-2000:]
    folder = run / "stages" / "vm_l"
    folder.mkdir(parents=True)
    make_model_folder(folder / "model", side=32)
    (folder / "eval.json").write_text(json.dumps({"dice_mean": 0.65, "num_pairs": 30}))
    second = _ship("--experiment2", "--workdir", str(run), "--dest", str(dest), "--stages", "vm_h", "vm_l")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "vm_h: already shipped as lpba40-vm-h-128" in second.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["lpba40-vm-h-128", "lpba40-vm-l"]


def test_unfinished_stages_are_skipped_and_the_two_experiments_cannot_be_asked_at_once(tmp_path):
    run = _run_folder(tmp_path, ["ctl_s0"])
    dest = tmp_path / "pretrained"
    proc = _ship("--experiment2", "--workdir", str(run), "--dest", str(dest))
    assert proc.returncode == 0 and "crd_paper_s0: not finished, skipped" in proc.stdout
    assert [p.name for p in dest.iterdir()] == ["lpba40-vm-l-control"]
    both = _ship("--experiment1", "--experiment2", "--workdir", str(run), "--dest", str(dest))
    assert both.returncode == 2 and "not allowed with" in both.stderr


def _restores_a_lost_run_folder(tmp_path, dest):
    """VM-H and VM-L of Experiment 2 go into the package as soon as they finish; a new run folder (the old one
    lost) gets them back instead of training them again, but only where the card matches the config's stage."""
    card = json.loads((dest / "lpba40-vm-h-128" / "model.json").read_text())["shipped"]
    assert card["recipe"].startswith("VM-H (Experiment 2") and card["steps"] == 10_000
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import crd_experiment

    crd_experiment.select(2)
    args = crd_experiment.parser().parse_args(["--experiment", "2", "--data-root", str(tmp_path / "data")])
    args.workdir = tmp_path / "new-run"
    config = crd_experiment.run_config(args)
    config.data.resample_shape = (32, 32, 32)  # the grid _run_folder's cards record
    assert crd_experiment.restore_shipped_stages(config, args.workdir, 2, dest) == ["vm_h", "vm_l"]
    from crd_jax.training import pipeline, workdir_config

    workdir_config.lock(args.workdir)  # as crd_experiment.run leaves the folder: the pipeline takes it from here
    pipeline.check_run_config(config, args.workdir)
    for stage, name in (("vm_h", "lpba40-vm-h-128"), ("vm_l", "lpba40-vm-l")):
        copied = args.workdir / "stages" / stage / "model" / "params.msgpack"
        assert copied.read_bytes() == (dest / name / "params.msgpack").read_bytes()
    log = json.loads((args.workdir / "restored.json").read_text())
    assert [r["stage"] for r in log] == ["vm_h", "vm_l"] and log[0]["from"] == "crd_jax/pretrained/lpba40-vm-h-128"
    # nothing twice; a stage trained for other steps, or on another grid, is not taken for this one
    assert crd_experiment.restore_shipped_stages(config, args.workdir, 2, dest) == []
    config.stages.vm_h.steps = 5_000
    assert crd_experiment.restore_shipped_stages(config, tmp_path / "other", 2, dest) == ["vm_l"]
    config.data.resample_shape = (128, 128, 128)
    assert crd_experiment.restore_shipped_stages(config, tmp_path / "third", 2, dest) == []
    assert crd_experiment.restore_shipped_stages(config, tmp_path / "fourth", 1, dest) == []
