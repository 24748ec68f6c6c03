"""Issue 30, a user's first hour: the presets and the not-pre-aligned warning of ``register``, and ``figure
--from`` drawing a saved registration; commands in fresh processes on tiny volumes written to tmp_path."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax.data.io import Volume


def _crd(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "crd_jax", *map(str, argv)], cwd=cwd, capture_output=True, text=True)


def _sphere(shape, centre, radius=10.0):
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    inside = (np.linalg.norm(grid - np.asarray(centre, np.float32), axis=-1) < radius).astype(np.float32)
    return (
        ndimage.gaussian_filter(inside, 1.0)
        + 0.3 * ndimage.gaussian_filter(np.random.default_rng(0).random(shape).astype(np.float32), 2.0) * inside
    )


def test_centroid_distance_against_scipy_center_of_mass():
    from crd_jax.registration.checks import centroid_distance_mm

    shape = (30, 28, 26)
    fixed, moving = _sphere(shape, (12, 14, 13), 6), _sphere(shape, (18, 11, 13), 6)
    spacing = np.array([1.2, 0.9, 1.5])
    vol = Volume(fixed, np.diag([*spacing, 1.0]))

    def centroid(a):
        return np.asarray(ndimage.center_of_mass(a > a.min() + 0.1 * np.ptp(a)))

    expected = np.linalg.norm((centroid(fixed) - centroid(moving)) * spacing)
    assert centroid_distance_mm(vol, moving) == pytest.approx(expected, rel=1e-4)


def test_presets_resolve_to_affine_and_instance_optimisation():
    from crd_jax.cli.main import parser
    from crd_jax.cli.options import registration_kwargs

    def kwargs(*extra):
        args = parser().parse_args(["register", "--fixed", "f", "--moving", "m", "--out-dir", "o", *extra])
        return registration_kwargs(args)

    assert (kwargs()["affine"], kwargs()["io_steps"]) == ("ncc", 0)
    assert (kwargs("--quality", "accurate")["affine"], kwargs("--quality", "accurate")["io_steps"]) == ("ncc", 50)
    assert kwargs("--quality", "accurate", "--io-steps", "5")["io_steps"] == 5  # explicit options win
    assert kwargs("--no-affine")["affine"] == "" and kwargs("--affine", "mi")["affine"] == "nmi"


def test_the_preset_cost_in_the_help_matches_the_results_file():
    from pathlib import Path

    from crd_jax.cli.options import PRESET_COST

    results = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "register_options.json").read_text())
    options = results["options"]
    accurate, fast = options["--quality accurate (affine + --io-steps 50)"], options["--quality fast (default: affine)"]
    gain = accurate["dice_mean"] - fast["dice_mean"]
    assert f"about {gain:+.2f} Dice" in PRESET_COST, (gain, PRESET_COST)


def test_radiological_display_puts_the_patients_right_on_the_left():
    from crd_jax.cli.drawing import _slices, to_display

    ras = np.zeros((20, 22, 18), np.float32)
    ras[16:19, 10:12, 8:10] = 1.0  # a blob at the patient's right (high x in RAS), centred in y and z
    lps = ras[::-1, ::-1]  # the same image stored LPS
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [19.0, 21.0, 0.0]
    disp = np.zeros((*lps.shape, 3), np.float32)
    disp[..., 0] = 2.0  # +2 voxels along the stored x axis (towards the patient's left, -2 mm in RAS x)
    shown, disp_ras = to_display(affine, {"img": lps}, disp)
    from crd_jax.cli.drawing import display_spacing

    permuted = np.diag([1.2, 0.9, 2.0, 1.0])[:, [1, 0, 2, 3]]  # stored axes A (0.9 mm), R (1.2 mm), S (2 mm)
    assert display_spacing(permuted) == pytest.approx((1.2, 0.9, 2.0))
    np.testing.assert_array_equal(shown["img"], ras)
    np.testing.assert_allclose(disp_ras[..., 0], -2.0)
    axial, coronal, _ = _slices(shown["img"])
    # drawn as imshow(s.T, origin="lower"): the first index runs left to right on the screen
    assert np.argmax(axial.max(axis=1)) < axial.shape[0] // 2 and np.argmax(coronal.max(axis=1)) < coronal.shape[0] // 2


@pytest.mark.slow
def test_register_warns_on_an_unaligned_pair_and_figure_draws_the_saved_result(tmp_path, shift_model):
    shape = (48, 48, 48)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(_sphere(shape, (24, 24, 24)), affine), tmp_path / "f.nii.gz")
    nib.save(nib.Nifti1Image(_sphere(shape, (36, 24, 24)), affine), tmp_path / "m.nii.gz")  # 12 mm away
    seg = (_sphere(shape, (36, 24, 24)) > 0.5).astype(np.uint8) * 3
    nib.save(nib.Nifti1Image(seg, affine), tmp_path / "s.nii.gz")

    proc = _crd(
        "register",
        "--model",
        shift_model,
        "--fixed",
        "f.nii.gz",
        "--moving",
        "m.nii.gz",
        "--moving-seg",
        "s.nii.gz",
        "--no-affine",
        "--out-dir",
        "out",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "without --no-affine" in warnings[0], proc.stderr
    assert 11.0 < float(warnings[0].split(" mm apart")[0].split()[-1]) < 13.0, warnings[0]
    record = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert record["fixed"] == str((tmp_path / "f.nii.gz").resolve()) and record["options"]["affine"] is None
    assert record["warning"] == warnings[0].split("warning: ", 1)[1]

    # an aligned pair: no warning
    aligned = _crd(
        "register",
        "--model",
        shift_model,
        "--fixed",
        "f.nii.gz",
        "--moving",
        "f.nii.gz",
        "--no-affine",
        "--out-dir",
        "same",
        cwd=tmp_path,
    )
    assert aligned.returncode == 0 and "warning" not in aligned.stderr, aligned.stderr

    # the figure of the saved registration: no model loaded, the saved files drawn
    fig = _crd("figure", "--from", "out", "--out", "out/overview.png", cwd=tmp_path)
    assert fig.returncode == 0, fig.stderr[-2000:]
    assert "drawn from the saved registration in out (no model loaded, nothing registered)" in fig.stdout
    assert (tmp_path / "out" / "overview.png").stat().st_size > 10_000

    # bad input: one line, exit 2, nothing written
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for argv, message in (
        (("figure", "--from", "nowhere", "--out", "x.png"), "no such folder"),
        (("figure", "--from", "out", "--model", shift_model, "--out", "x.png"), "leave out --model"),
        (
            ("register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--affine", "--no-affine", "--out-dir", "o2"),
            "contradicts --affine",
        ),
    ):
        bad = _crd(*argv, cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, (argv, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_subject_ranges_and_lists():
    from crd_jax.cli.evaluate import parse_subjects
    from crd_jax.errors import InputError

    ids = [f"S{i:02d}" for i in range(1, 41)]
    assert parse_subjects("S01-S03", ids, "d") == ["S01", "S02", "S03"]
    assert parse_subjects("S05,S01-S02,S05", ids, "d") == ["S05", "S01", "S02"]
    assert parse_subjects("S09-10", ids, "d") == ["S09", "S10"]
    cases = (("S01-S50", "no subject S41"), ("S03-S01", "backwards"), ("S01", "at least 2"), ("x1,S01", "no subject x1"))
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            parse_subjects(bad, ids, "d")


@pytest.mark.slow
def test_evaluate_a_folder_of_subjects_at_the_files_resolution(tmp_path, shift_model):
    """``evaluate --data-root DIR --subjects S01-S03`` in a fresh process: the Dice of each pair equals the Dice,
    computed here with numpy, of what ``crd-jax register`` writes for that pair."""
    shape = (36, 34, 32)
    affine = np.diag([1.2, 1.0, 1.0, 1.0])
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "labels").mkdir()
    for i, centre in enumerate([(18, 17, 16), (19, 16, 16), (17, 18, 15)], 1):
        image = _sphere(shape, centre, 11.0)
        inside = image > 0.5
        labels = (inside.astype(np.uint8) + inside * (np.arange(shape[0])[:, None, None] > centre[0])).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "d" / "images" / f"S0{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), tmp_path / "d" / "labels" / f"S0{i}.nii.gz")
    common = ("--model", shift_model, "--no-affine")
    proc = _crd("evaluate", *common, "--data-root", "d", "--subjects", "S01-S03", "--no-hd95", "--out-dir", "ev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "ev" / "summary.md").read_text()
    assert "on 6 pairs of S01, S02, S03" in summary and "Dice at the files' resolution" in summary
    assert "36x34x32 of 1.2 x 1 x 1 mm" in summary
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["resolution"] == "files"
    import csv

    rows = {(r["moving"], r["fixed"]): r for r in csv.DictReader((tmp_path / "ev" / "metrics.csv").open())}
    assert len(rows) == 6
    reg = _crd(
        "register",
        *common,
        "--fixed",
        "d/images/S01.nii.gz",
        "--moving",
        "d/images/S03.nii.gz",
        "--moving-seg",
        "d/labels/S03.nii.gz",
        "--out-dir",
        "reg",
        cwd=tmp_path,
    )
    assert reg.returncode == 0, reg.stderr[-2000:]
    warped = np.asarray(nib.load(tmp_path / "reg" / "warped_seg.nii.gz").dataobj)
    fixed = np.asarray(nib.load(tmp_path / "d" / "labels" / "S01.nii.gz").dataobj)
    dice = np.mean([2 * np.sum((warped == k) & (fixed == k)) / (np.sum(warped == k) + np.sum(fixed == k)) for k in (1, 2)])
    assert float(rows[("S03", "S01")]["dice"]) == pytest.approx(dice, abs=1e-5)

    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for argv, message in (
        (("--subjects", "S01-S09"), "no subject S04"),
        (("--split", "val"), "without --config"),
        (("--resolution", "model"), "needs --config"),
    ):
        bad = _crd("evaluate", *common, "--data-root", "d", *argv, "--out-dir", "ev2", cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, (argv, bad.stderr)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
