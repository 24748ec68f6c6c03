"""``crd-jax register --pairs`` at scale: inputs checked before the first pair, --skip-existing, --keep-going and
failures.csv, --outputs, the compact field and its one expander, the flat Learn2Reg layout, shards and the Dask
runner, the per-step log (-q, -v, --log FILE). The slow test runs a 200-pair batch as a cluster would: two
shards in fresh processes, one killed and resumed, a Dask local cluster, against a single-process run."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax.cli.main import main
from crd_jax.registration import batch, compact

SHAPE = (16, 16, 16)
ROOT = Path(__file__).resolve().parents[1]


def _volume(seed, shape=SHAPE):
    v = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    return ((v - v.min()) / np.ptp(v)).astype(np.float32)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([1.5, 1.5, 1.5, 1.0]) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A VM-L model folder with its random initial weights (flow head included, scaled down): the field depends
    on the pair, so comparing runs compares real fields, and it is small enough for 200 pairs."""
    import jax
    import jax.numpy as jnp

    from crd_jax.interop import official
    from crd_jax.model_io import save_model
    from crd_jax.models.build import model_from_spec

    arch = official.ARCHITECTURE | {"fusion": "paper", "teacher_align_corners": False}
    spec = {
        "kind": "registrar",
        "factor": 2,
        "architecture": arch,
        "label": "VM-L (random, test)",
        "stage": "test",
        "preprocessing": {"normalize": "minmax", "percentiles": [0.5, 99.5], "resample_shape": [], "multiple": 32, "ndim": 3},
    }
    model = model_from_spec(spec)
    x = jnp.zeros((1, 32, 32, 32, 1))
    params = model.init(jax.random.PRNGKey(3), x, x)
    params["flow"]["conv"]["kernel"] = params["flow"]["conv"]["kernel"] * 50.0
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(path, params, spec)
    return path


def _pairs(folder, n, bad=()):
    """``n`` pairs of 16^3 volumes in ``folder`` (8 images reused) and pairs.csv; rows in ``bad`` broken."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        if not (folder / f"img{i:04d}.nii.gz").exists():
            _save(folder / f"img{i:04d}.nii.gz", _volume(i))
    rows = ["fixed,moving,name"]
    for r in range(n):
        f, m = r % 8, (r * 3 + 1) % 8
        fixed, moving = f"img{f:04d}.nii.gz", f"img{m:04d}.nii.gz"
        if r in bad:
            moving = f"missing{r}.nii.gz" if r % 2 == 0 else f"nan{r}.nii.gz"
            if r % 2:
                _save(folder / moving, np.full(SHAPE, np.nan, np.float32))
        rows.append(f"{fixed},{moving},p{r:03d}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


# --- which pairs --------------------------------------------------------------------------------------------------


def test_shards_hold_every_pair_exactly_once_and_default_to_the_slurm_array():
    tasks = [batch.Task(i, i + 1, f"p{i}", "f", "m") for i in range(23)]
    for n in (1, 2, 5, 30):
        got = sorted(t.index for k in range(n) for t in batch.select_shard(tasks, k, n))
        assert got == list(range(23))
    assert batch.parse_shard("1/4", {}) == (1, 4)
    assert batch.parse_shard(None, {}) == (0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert batch.parse_shard(None, env) == (2, 3)
    assert batch.parse_shard("0/2", env) == (0, 2)  # --shard wins
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            batch.parse_shard(bad, {})


def test_learn2reg_ids_from_names():
    assert batch.learn2reg_ids("a/img0438.nii.gz", "OASIS_0439_0000.nii.gz", None) == ("0438", "0439")
    assert batch.learn2reg_ids("x.nii.gz", "y.nii.gz", "0001_0002") == ("0001", "0002")
    assert batch.learn2reg_ids("x.nii.gz", "y1.nii.gz", None) is None


# --- checks before the first pair ---------------------------------------------------------------------------------


def test_bad_rows_are_one_line_each_before_anything_runs(tmp_path, tiny_model, capsys):
    pairs = _pairs(tmp_path, 6)
    _save(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.float32))
    (tmp_path / "trunc.nii").write_bytes(b"\x5c\x01\x00\x00" + b"\x00" * 100)
    text = pairs.read_text().splitlines()
    text[2] = "img0001.nii.gz,gone.nii.gz,p001"
    text[4] = "flat.nii.gz,img0001.nii.gz,p003"
    text[6] = "img0001.nii.gz,trunc.nii,p005"
    pairs.write_text("\n".join(text) + "\n")
    out = tmp_path / "out"
    assert main(["register", "--model", str(tiny_model), "--pairs", str(pairs), "--out-dir", str(out), "--no-affine"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3, err
    assert "gone.nii.gz: no such file" in err[0] and "row 2" in err[0]
    assert "flat.nii.gz" in err[1] and "2-D" in err[1] and "row 4" in err[1]
    assert "trunc.nii" in err[2] and "row 6" in err[2] and "nothing registered" in err[2]
    assert not out.exists()


# --- resuming, failures, outputs ---------------------------------------------------------------------------------


def test_skip_existing_keep_going_failures_csv_and_outputs(tmp_path, tiny_model, capsys):
    pairs = _pairs(tmp_path, 5, bad=(2, 3))
    out = tmp_path / "out"
    argv = [
        "register",
        "--model",
        str(tiny_model),
        "--pairs",
        str(pairs),
        "--out-dir",
        str(out),
        "--no-affine",
        "--outputs",
        "disp",
        "--keep-going",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "[1/4] p000:" in captured.out and "FAILED (row 4)" in captured.out and "nan3.nii.gz" in captured.out
    assert "2 pairs failed" in captured.err and "failures.csv" in captured.err
    with open(out / "failures.csv") as f:
        failures = list(csv.DictReader(f))
    assert [r["name"] for r in failures] == ["p002", "p003"]
    assert "missing2.nii.gz: no such file" in failures[0]["reason"] and "NaN" in failures[1]["reason"]
    assert sorted(p.name for p in (out / "p000").iterdir()) == ["disp.nii.gz", "registration.json"]
    assert not (out / "p002").exists() and not (out / "p003").exists()
    # an incomplete set (a file lost) is redone; complete ones are skipped, untouched
    (out / "p001" / "disp.nii.gz").unlink()
    before = (out / "p000" / "disp.nii.gz").stat().st_mtime_ns
    assert main(argv[:-1] + ["--skip-existing"]) == 2  # without --keep-going the bad rows refuse the run
    assert "row 3" in capsys.readouterr().err
    _pairs(tmp_path, 5)  # the rows fixed
    assert main(argv + ["--skip-existing"]) == 0
    text = capsys.readouterr().out
    assert "registered 3 pairs" in text and "skipped 2 complete" in text
    assert (out / "p000" / "disp.nii.gz").stat().st_mtime_ns == before
    assert (out / "p001" / "disp.nii.gz").is_file() and (out / "p003" / "disp.nii.gz").is_file()
    assert not (out / "failures.csv").exists()  # it describes the latest run: none failed
    # without --skip-existing, existing outputs are refused before the first pair
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # registration.json: inputs with their hashes, the model's version, options, timings
    record = json.loads((out / "p000" / "registration.json").read_text())
    fixed = tmp_path / "img0000.nii.gz"
    assert record["inputs"]["fixed"] == {"path": str(fixed), "sha256": hashlib.sha256(fixed.read_bytes()).hexdigest()}
    assert (
        record["model_version"]["sha256"]["params.msgpack"]
        == hashlib.sha256((tiny_model / "params.msgpack").read_bytes()).hexdigest()
    )
    assert record["options"]["outputs"] == ["disp"] and record["folds"] >= 0
    assert {"load", "prepare", "predict", "map back", "warp"} <= set(record["timings"])


def test_dice_in_the_record_with_a_fixed_label_map(tmp_path, tiny_model, capsys):
    f, m = _save(tmp_path / "f.nii.gz", _volume(0)), _save(tmp_path / "m.nii.gz", _volume(1))
    seg = (_volume(0) > 0.5).astype(np.uint8)
    _save(tmp_path / "fs.nii.gz", seg)
    _save(tmp_path / "ms.nii.gz", seg)
    out = tmp_path / "o"
    assert (
        main(
            [
                "register",
                "--model",
                str(tiny_model),
                "--fixed",
                f,
                "--moving",
                m,
                "--moving-seg",
                str(tmp_path / "ms.nii.gz"),
                "--fixed-seg",
                str(tmp_path / "fs.nii.gz"),
                "--out-dir",
                str(out),
                "--no-affine",
            ]
        )
        == 0
    )
    record = json.loads((out / "registration.json").read_text())
    warped = np.asarray(nib.load(out / "warped_seg.nii.gz").dataobj)
    expected = 2 * np.sum((warped == 1) & (seg == 1)) / (np.sum(warped == 1) + np.sum(seg == 1))
    assert record["dice"]["mean"] == pytest.approx(expected, abs=1e-6)
    assert "Dice with --fixed-seg" in capsys.readouterr().out


# --- the compact field ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compact_field_expands_to_the_full_field_within_1e4_voxels(tmp_path, capsys):
    """The shipped model (its own orientation and voxel size: reoriented, resampled) with the affine step: the
    compact file is a fraction of the full field, and expand() gives the field --disp-format voxel writes."""
    lps = np.diag([-3.0, -3.0, 3.0, 1.0])
    lps[:3, 3] = [90, 110, -70]
    shape = (48, 56, 44)
    f = _save(tmp_path / "f.nii.gz", _volume(0, shape), lps)
    m = _save(tmp_path / "m.nii.gz", ndimage.shift(_volume(0, shape), (1.5, -1, 0.5), mode="nearest"), lps)
    base = ["register", "--fixed", f, "--moving", m]
    assert main(base + ["--out-dir", str(tmp_path / "full")]) == 0
    assert main(base + ["--out-dir", str(tmp_path / "small"), "--disp-format", "compact", "--outputs", "disp"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["disp_compact.npz", "registration.json"]
    full = nib.load(tmp_path / "full" / "disp.nii.gz")
    field, affine = compact.expand(tmp_path / "small" / "disp_compact.npz")
    assert field.shape == full.shape and np.abs(field).max() > 0.1
    np.testing.assert_allclose(affine, full.affine, atol=1e-5)
    assert np.abs(field - full.get_fdata()).max() < 1e-4
    with np.load(tmp_path / "small" / "disp_compact.npz", allow_pickle=False) as z:
        assert "affine_matrix" in z and "orientation" in z  # the affine step and the reorientation were stored
    # export expands it too: the same field in the ITK format as from the full one
    for name, disp in (("a", tmp_path / "full" / "disp.nii.gz"), ("b", tmp_path / "small" / "disp_compact.npz")):
        assert main(["export", "--disp", str(disp), "--fixed", f, "--format", "itk", "--out-dir", str(tmp_path / name)]) == 0
    a, b = (nib.load(tmp_path / n / "disp_itk.nii.gz").get_fdata() for n in "ab")
    assert np.abs(a - b).max() < 1e-3


def _compact_arrays(tmp_path):
    """A valid compact file's arrays (a 16^3 grid from an 8^3 model grid, reoriented, with an affine step)."""
    field = compact.NetworkField(
        np.full((8, 10, 8, 3), 0.5, np.float32),
        ((0, 8, 0, 0), (1, 9, 0, 0), (0, 8, 0, 0)),
        (8, 8, 8),
        (16, 16, 16),
        np.array([[0, -1], [1, -1], [2, 1]], np.float64),
        np.eye(3),
        np.zeros(3),
    )
    compact.save(tmp_path / "good.npz", field, np.diag([2.0, 2.0, 2.0, 1.0]))
    with np.load(tmp_path / "good.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.keys()}


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("format", np.zeros(0, np.int32), "format must be one integer"),
        ("format", np.array([2], np.int32), "newer than this crd-jax"),
        ("grid", np.array([100000, 100000, 100000]), "more memory"),  # ran ~60 s, then XLA aborted
        ("grid", np.array([16, 0, 16]), "grid must be"),
        ("grid", np.array([16.5, 16, 16]), "grid must be"),
        ("work", np.array([8, 0, 8]), "work"),
        ("work", np.array([8, 9, 8]), "window"),  # the windows no longer add up to it: a silently wrong field
        ("windows", np.array([[0, 8, 0, 0], [5, 20, 0, 0], [0, 8, 0, 0]]), "window"),
        ("windows", np.array([[0, 8, 0, 0], [1, 9, -1, 1], [0, 8, 0, 0]]), "window"),
        ("canvas", np.full((8, 10, 8, 3), np.nan, np.float32), "NaN"),
        ("fixed_affine", np.full((4, 4), np.nan), "finite 4x4"),  # wrote an all-zero image with status 0
        ("fixed_affine", np.zeros((4, 4)), "degenerate geometry"),
        ("orientation", np.array([[0, -1], [7, -1], [2, 1]], np.float64), "orientation"),  # an IndexError traceback
        ("orientation", np.array([[0, -1], [1, 0], [2, 1]], np.float64), "signs"),
        ("affine_translation", np.array([0.0, np.inf, 0.0]), "pre-alignment"),
        ("affine_translation", None, "come together"),
    ],
)
def test_a_damaged_compact_file_is_one_line_before_anything_expands(tmp_path, key, value, needle):
    from crd_jax.errors import InputError

    arrays = _compact_arrays(tmp_path)
    good, _ = compact.expand(tmp_path / "good.npz")  # the untouched file expands
    assert good.shape == (16, 16, 16, 3) and np.isfinite(good).all()
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=needle):
        compact.expand(tmp_path / "bad.npz")


def test_a_compact_file_of_a_finely_sampled_fixed_image_expands(tmp_path):
    """50 nm voxels (a geometry crd-jax reads) are not a "singular" affine: the file's affine passes the checks
    the fixed image passed."""
    arrays = _compact_arrays(tmp_path)
    arrays["fixed_affine"] = np.diag([5e-5, 5e-5, 5e-5, 1.0])
    np.savez(tmp_path / "fine.npz", **arrays)
    field, affine = compact.expand(tmp_path / "fine.npz")
    assert field.shape == (16, 16, 16, 3) and affine[0, 0] == 5e-5


def test_learn2reg_layout_is_flat_in_the_output_folder(tmp_path, tiny_model, capsys):
    pairs = _pairs(tmp_path, 3)
    out = tmp_path / "sub"
    assert (
        main(
            [
                "register",
                "--model",
                str(tiny_model),
                "--pairs",
                str(pairs),
                "--out-dir",
                str(out),
                "--no-affine",
                "--disp-format",
                "learn2reg",
                "--outputs",
                "disp",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "disp_0000_0001.nii.gz",
        "disp_0000_0001.npz",
        "disp_0001_0004.nii.gz",
        "disp_0001_0004.npz",
        "disp_0002_0007.nii.gz",
        "disp_0002_0007.npz",
        "p000",
        "p001",
        "p002",
    ]
    assert sorted(p.name for p in (out / "p000").iterdir()) == ["registration.json"]
    assert (
        main(
            [
                "register",
                "--model",
                str(tiny_model),
                "--pairs",
                str(pairs),
                "--out-dir",
                str(out),
                "--no-affine",
                "--disp-format",
                "learn2reg",
                "--outputs",
                "disp",
                "--skip-existing",
            ]
        )
        == 0
    )
    assert "skipped 3 complete" in capsys.readouterr().out


# --- the log -------------------------------------------------------------------------------------------------------


def test_steps_are_logged_with_v_and_to_a_file_and_q_is_quiet(tmp_path, tiny_model, capsys):
    f, m = _save(tmp_path / "f.nii.gz", _volume(0)), _save(tmp_path / "m.nii.gz", _volume(1))
    argv = ["register", "--model", str(tiny_model), "--fixed", f, "--moving", m, "--no-affine"]
    assert main(argv + ["--out-dir", str(tmp_path / "a"), "-v", "--log", str(tmp_path / "run.log")]) == 0
    err = capsys.readouterr().err
    for step in ("load:", "prepare:", "predict:", "map back:", "warp:", "write:"):
        assert f"crd-jax: {step}" in err, err
    logged = (tmp_path / "run.log").read_text()
    assert "INFO crd_jax.registration.steps: predict:" in logged
    assert main(argv + ["--out-dir", str(tmp_path / "b"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    # an error stays one line on stderr (not a terminal: no steps), and goes to the log file too
    assert main(argv + ["--out-dir", str(tmp_path / "b"), "--log", str(tmp_path / "run.log")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert "ERROR crd_jax: error:" in (tmp_path / "run.log").read_text()


def test_dask_absent_is_one_line_naming_the_extra(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    pairs = _pairs(tmp_path, 2)
    assert (
        main(
            ["register", "--model", str(tiny_model), "--pairs", str(pairs), "--out-dir", str(tmp_path / "o"), "--dask", "local:2"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crd-jax[dask]" in err[0]


# --- the must-show: 200 pairs across shards, a kill, a resume, a Dask cluster ------------------------------------


def _crd(argv, **env):
    """``python -m crd_jax ...`` in a fresh process (as a cluster job runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "crd_jax", *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=900,
    )


def _fields(root, names):
    return {n: np.asarray(nib.load(root / n / "disp.nii.gz").dataobj) for n in names if (root / n / "disp.nii.gz").is_file()}


def _failures(root):
    rows = []
    for path in sorted(root.glob("failures*.csv")):
        with open(path) as f:
            rows += [r["name"] for r in csv.DictReader(f)]
    return sorted(rows)


def _done(stdout):
    return [
        line.split("] ", 1)[1].split(":")[0]
        for line in stdout.splitlines()
        if line.startswith("[") and "FAILED" not in line and "skipped" not in line
    ]


@pytest.mark.slow
def test_200_pairs_in_shards_killed_and_resumed_and_on_dask_equal_one_process(tmp_path, tiny_model):
    broken = (50, 51, 150, 151)  # a missing file (found before the first pair) and a NaN image (found on reading)
    pairs = _pairs(tmp_path / "in", 204, bad=broken)
    names = [f"p{r:03d}" for r in range(204) if r not in broken]
    failed = sorted(f"p{r:03d}" for r in broken)
    common = ["register", "--model", tiny_model, "--pairs", pairs, "--no-affine", "--outputs", "disp", "--keep-going"]

    single = _crd(common + ["--out-dir", tmp_path / "single"])
    assert single.returncode == 1, single.stderr[-2000:]  # documented: 1 when a pair failed under --keep-going
    assert sorted(_done(single.stdout)) == names and _failures(tmp_path / "single") == failed
    reference = _fields(tmp_path / "single", names)
    assert len(reference) == 200

    # two shards at once into one folder (as two array tasks); shard 0 killed (SIGKILL) after 30 pairs
    shards = tmp_path / "shards"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "crd_jax", *map(str, common + ["--out-dir", shards, "--shard", f"{k}/2"])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **({"CRD_JAX_DEBUG_KILL_AFTER_PAIRS": "30"} if k == 0 else {})},
        )
        for k in (0, 1)
    ]
    (out0, _), (out1, err1) = (p.communicate(timeout=900) for p in procs)
    assert procs[0].returncode == -9 and procs[1].returncode == 1, err1[-2000:]
    assert len(_done(out0)) == 30
    resumed = _crd(common + ["--out-dir", shards, "--skip-existing"], SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2")
    assert resumed.returncode == 1, resumed.stderr[-2000:]
    assert "skipped 30 complete" in resumed.stdout
    done = _done(out0) + _done(out1) + _done(resumed.stdout)
    assert sorted(done) == names  # every pair registered exactly once across the shards, the kill and the resume
    assert all(int(n[1:]) % 2 == k for k, out in ((0, out0 + resumed.stdout), (1, out1)) for n in _done(out))
    assert _failures(shards) == failed and sorted(p.name for p in shards.glob("failures*")) == [
        "failures_0_of_2.csv",
        "failures_1_of_2.csv",
    ]
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]  # the killed run's staging folder removed
    union = _fields(shards, names)
    assert union.keys() == reference.keys()
    for n in names:
        np.testing.assert_allclose(union[n], reference[n], atol=1e-6, err_msg=n)

    # a Dask local cluster of two worker processes: the same fields, one model per worker
    pytest.importorskip("distributed", reason="the [dask] extra is not installed")
    on_dask = _crd(common + ["--out-dir", tmp_path / "dask", "--dask", "local:2"])
    assert on_dask.returncode == 1, on_dask.stderr[-3000:]
    assert sorted(_done(on_dask.stdout)) == names and _failures(tmp_path / "dask") == failed
    records = [json.loads((tmp_path / "dask" / n / "registration.json").read_text())["process"] for n in names]
    assert len({r["pid"] for r in records}) <= 2 and {r["model_loads"] for r in records} == {1}
    fields = _fields(tmp_path / "dask", names)
    for n in names:
        np.testing.assert_allclose(fields[n], reference[n], atol=1e-6, err_msg=n)


# --- fixed labels in the pairs file (Dice, summary.json) and one QC figure per pair (--qc) ------------------------


def _labels(seed):
    """Two labels of a smooth random volume (1: high, 2: low intensity), uint8, on the 16^3 grid."""
    v = _volume(seed)
    return ((v > 0.6) * 1 + (v < 0.3) * 2).astype(np.uint8)


def _hand_dice(warped_seg, fixed_seg):
    """Mean Dice over the labels (not 0) of either map, by hand."""
    labels = sorted((set(np.unique(warped_seg)) | set(np.unique(fixed_seg))) - {0})
    return float(
        np.mean(
            [
                2 * np.sum((warped_seg == lab) & (fixed_seg == lab)) / (np.sum(warped_seg == lab) + np.sum(fixed_seg == lab))
                for lab in labels
            ]
        )
    )


def _pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGBA"))


def test_pairs_file_columns_fixed_seg_last_without_a_header_any_order_with_one(tmp_path):
    from crd_jax.cli.register import read_register_pairs
    from crd_jax.data.pairs import read_pairs_file
    from crd_jax.errors import InputError

    path = tmp_path / "p.csv"
    path.write_text("f.nii.gz,m.nii.gz\nf.nii.gz,m.nii.gz,ms.nii.gz,n2\nf.nii.gz,m.nii.gz,ms.nii.gz,n3,fs.nii.gz\n")
    rows = read_pairs_file(path)  # files of 2 to 4 columns keep their meaning; the 5th is fixed_seg
    assert [(r.moving_seg, r.name, r.fixed_seg) for r in rows] == [
        (None, None, None),
        ("ms.nii.gz", "n2", None),
        ("ms.nii.gz", "n3", "fs.nii.gz"),
    ]
    path.write_text("fixed_seg,moving,fixed,moving_seg\nfs.nii.gz,m.nii.gz,f.nii.gz,ms.nii.gz\n")
    (row,) = read_pairs_file(path)
    assert (row.fixed, row.moving, row.moving_seg, row.fixed_seg) == ("f.nii.gz", "m.nii.gz", "ms.nii.gz", "fs.nii.gz")
    tasks = read_register_pairs(path)  # relative to the file's folder
    assert tasks[0].fixed_seg == str(tmp_path / "fs.nii.gz")
    path.write_text("fixed,moving,fixed_seg\nf.nii.gz,m.nii.gz,fs.nii.gz\n")
    with pytest.raises(InputError, match="row 1: a fixed_seg without a moving_seg"):
        read_register_pairs(path)
    with pytest.raises(InputError, match="header row"):  # evaluate's columns: fixed_seg is not one of them
        read_pairs_file(path, columns=("fixed", "moving"))


@pytest.mark.slow
def test_batch_dice_summary_and_a_qc_figure_per_pair_in_fresh_processes(tmp_path, tiny_model):
    """register --pairs with fixed_seg in the headerless 5th column and --qc, as a user runs it: each pair's Dice
    (its line and registration.json) equals Dice computed by hand from the written warped_seg and the fixed
    labels; summary.json holds their mean and sd; each pair's folder holds qc.png, the PNG `figure --from`
    draws of it; --skip-existing skips the pairs (figures included) and redoes one whose qc.png is gone."""
    for i in range(4):
        _save(tmp_path / f"img{i}.nii.gz", _volume(i))
        _save(tmp_path / f"seg{i}.nii.gz", _labels(i))
    rows = [
        "img0.nii.gz,img1.nii.gz,seg1.nii.gz,a,seg0.nii.gz",
        "img2.nii.gz,img3.nii.gz,seg3.nii.gz,b,seg2.nii.gz",
        "img1.nii.gz,img2.nii.gz,seg2.nii.gz,c,seg1.nii.gz",
        "img3.nii.gz,img0.nii.gz,,d",
    ]  # d: no labels
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["register", "--model", tiny_model, "--pairs", tmp_path / "pairs.csv", "--out-dir", out, "--no-affine", "--qc"]
    run = _crd(argv)
    assert run.returncode == 0, run.stderr[-3000:]
    hand = {}
    for name, fixed in (("a", 0), ("b", 2), ("c", 1)):
        warped = np.asarray(nib.load(out / name / "warped_seg.nii.gz").dataobj)
        hand[name] = _hand_dice(warped, np.asarray(nib.load(tmp_path / f"seg{fixed}.nii.gz").dataobj))
        record = json.loads((out / name / "registration.json").read_text())
        assert record["dice"]["mean"] == pytest.approx(hand[name], abs=1e-6)
        assert record["fixed_seg"] == str(tmp_path / f"seg{fixed}.nii.gz")
        assert f"] {name}: " in run.stdout and f"Dice {hand[name]:.4f}" in run.stdout.split(f"] {name}: ")[1].splitlines()[0]
    assert 0.05 < min(hand.values()) and max(hand.values()) < 0.999  # real, different overlaps
    assert "Dice" not in run.stdout.split("] d: ")[1].splitlines()[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice"]["pairs"] == 3 and summary["dice"]["per_pair"] == pytest.approx(hand, abs=1e-6)
    assert summary["dice"]["mean"] == pytest.approx(np.mean(list(hand.values())), abs=1e-6)
    assert summary["dice"]["sd"] == pytest.approx(np.std(list(hand.values())), abs=1e-6)
    assert (summary["pairs"], summary["registered"], summary["skipped"], summary["failed"]) == (4, 4, 0, 0)
    assert f"Dice over 3 pairs with labels: mean {summary['dice']['mean']:.4f}" in run.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # written atomically: no temporary left

    # one qc.png per pair, of the figure's size (15 x 9.6 in at 80 dpi), the pixels `figure --from` draws
    figures = {name: _pixels(out / name / "qc.png") for name in "abcd"}
    assert all(p.shape == (768, 1200, 4) for p in figures.values())
    drawn = _crd(["figure", "--from", out / "a", "--fixed-seg", tmp_path / "seg0.nii.gz", "--out", tmp_path / "a.png"])
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), figures["a"])
    assert not np.array_equal(figures["a"], figures["b"])

    # resumed: every pair complete (qc.png included) is skipped; the summary still covers them
    stamps = {name: (out / name / "qc.png").stat().st_mtime_ns for name in "abcd"}
    again = _crd(argv + ["--skip-existing"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "registered 0 pairs" in again.stdout and "skipped 4 complete" in again.stdout
    assert {name: (out / name / "qc.png").stat().st_mtime_ns for name in "abcd"} == stamps
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["dice"] == summary["dice"] and (resumed["registered"], resumed["skipped"]) == (0, 4)
    # a set without its figure is incomplete: redone, figure and all
    (out / "b" / "qc.png").unlink()
    third = _crd(argv + ["--skip-existing"])
    assert third.returncode == 0 and "registered 1 pair " in third.stdout and "skipped 3 complete" in third.stdout
    np.testing.assert_array_equal(_pixels(out / "b" / "qc.png"), figures["b"])


@pytest.mark.slow
def test_qc_needs_the_warped_image_and_works_for_one_pair(tmp_path, tiny_model, capsys):
    pairs = _pairs(tmp_path, 2)
    out = tmp_path / "out"
    refused = _crd(
        ["register", "--model", tiny_model, "--pairs", pairs, "--out-dir", out, "--no-affine", "--qc", "--outputs", "disp"]
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--qc: draws the saved warped image and displacement; add warped to --outputs" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()
    # one pair: qc.png beside the outputs, with the fixed labels drawn against the warped ones
    f, m = _save(tmp_path / "f.nii.gz", _volume(0)), _save(tmp_path / "m.nii.gz", _volume(1))
    fs, ms = _save(tmp_path / "fs.nii.gz", _labels(0)), _save(tmp_path / "ms.nii.gz", _labels(1))
    one = tmp_path / "one"
    assert (
        main(
            [
                "register",
                "--model",
                str(tiny_model),
                "--fixed",
                f,
                "--moving",
                m,
                "--moving-seg",
                ms,
                "--fixed-seg",
                fs,
                "--out-dir",
                str(one),
                "--no-affine",
                "--qc",
            ]
        )
        == 0
    )
    assert f"wrote {one / 'qc.png'}" in capsys.readouterr().out
    assert main(["figure", "--from", str(one), "--fixed-seg", fs, "--out", str(tmp_path / "ref.png")]) == 0
    np.testing.assert_array_equal(_pixels(one / "qc.png"), _pixels(tmp_path / "ref.png"))
    # the compact field and the flat Learn2Reg layout are drawn from too
    for fmt in ("compact", "learn2reg"):
        assert (
            main(
                [
                    "register",
                    "--model",
                    str(tiny_model),
                    "--pairs",
                    str(pairs),
                    "--out-dir",
                    str(tmp_path / fmt),
                    "--no-affine",
                    "--qc",
                    "--disp-format",
                    fmt,
                ]
            )
            == 0
        )
        assert _pixels(tmp_path / fmt / "p001" / "qc.png").shape == (768, 1200, 4)
    capsys.readouterr()
    a, b = (_pixels(tmp_path / fmt / "p000" / "qc.png") for fmt in ("compact", "learn2reg"))
    assert np.mean(a != b) < 1e-3  # the same field (within 1e-4 voxels), so the same figure
