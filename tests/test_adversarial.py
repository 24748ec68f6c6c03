"""Adversarial inputs, each run as a fresh command (``python -m crd_jax ...`` or ``python train.py ...``) in a
subprocess, as a user (or an attacker) would run it. The contract for bad input: exit status 2 (130 for
Ctrl-C, 143 for SIGTERM), exactly one line on stderr naming the file (or option) and the problem, no
traceback, every file that existed before byte-identical afterwards and nothing new left behind (outputs
are all or nothing). Cases that succeed check that the result is right and that nothing of the user's
was touched. A few checks of the mechanisms behind the contract (the compiled-program cache, checkpoints,
the training loop) run in this process.

The kinds (reliability issue, round 2): path traversal through ``--pair-ids``, ``convert-official
--overwrite`` over a user's notes, label maps on another grid, labels beyond int32, images without qform
or sform, a too-small field of view, hand-edited ``model.json`` (schema), ``train.py`` config values,
``register --overwrite`` over an earlier run's set, truncated files, special files, header-bounded
inflation, Ctrl-C and SIGTERM during instance optimisation, the thread-count cap, a planted cache entry,
stale staging folders, a damaged checkpoint, a NaN loss. (Ctrl-C and SIGTERM during instance optimisation
and training, which need compiled programs, are in tests/test_adversarial_training.py.)
"""

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from model_folders import make_model_folder

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the test session's cache folder (conftest) is inherited


def _volume(seed=0, shape=SHAPE):
    v = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    return ((v - v.min()) / np.ptp(v)).astype(np.float32)


def _nifti(path, data, affine=None):
    data = np.asarray(data)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=data.dtype), str(path))
    return str(path)


def snapshot(folder: Path):
    """Every path under ``folder``: type, mode and, for regular files, the content hash (special files are
    never opened)."""
    state = {}
    for p in sorted(Path(folder).rglob("*")):
        st = os.lstat(p)
        rel = p.relative_to(folder).as_posix()
        if stat.S_ISREG(st.st_mode):
            state[rel] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        elif stat.S_ISLNK(st.st_mode):
            state[rel] = ("link", os.readlink(p))
        else:
            state[rel] = ("other", st.st_mode)
    return state


def crd(argv, cwd, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "crd_jax", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**ENV, **(env or {})},
        timeout=timeout,
    )


def train_py(argv, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=timeout,
    )


def assert_one_line(proc, status, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model, _, _ = make_model_folder(root / "model", SHAPE[0], "minmax")
    geo, _, _ = make_model_folder(
        root / "geo",
        SHAPE[0],
        "minmax",
        geometry={"orientation": "RAS", "spacing": [2.5, 2.5, 2.5], "stored_shape": [64, 64, 64]},
    )
    shift, _, _ = make_model_folder(root / "shift", SHAPE[0], "minmax", bias=[0.75, -0.25, 0.125])
    a = {
        "root": root,
        "model": model,
        "geo": geo,
        "shift": shift,
        "f": _nifti(root / "f.nii.gz", _volume(0)),
        "m": _nifti(root / "m.nii.gz", _volume(1)),
        "disp": _nifti(root / "disp.nii.gz", np.zeros((*SHAPE, 3), np.float32)),
    }
    a["before"] = snapshot(root)
    return a


def _register(tmp, a, model=None, fixed=None, moving=None, extra=()):
    return [
        "register",
        "--model",
        model or a["model"],
        "--fixed",
        fixed or a["f"],
        "--moving",
        moving or a["m"],
        "--out-dir",
        tmp / "out",
        *extra,
    ]


def _edited_model(tmp, a, edit, raw=None):
    folder = tmp / "edited"
    shutil.copytree(a["model"], folder)
    spec = json.loads((folder / "model.json").read_text())
    edit(spec)
    (folder / "model.json").write_bytes(raw if raw is not None else json.dumps(spec).encode())
    return folder


def _geometry(spec, **changes):
    spec["preprocessing"]["geometry"] = {
        "orientation": "RAS",
        "spacing": [1.0, 1.0, 1.0],
        "stored_shape": [32, 32, 32],
        **changes,
    }


# --- the kinds: k_<name>(tmp, assets) -> (argv, source, message) ---------------------------------------------------
# data loss


def k_pair_ids_traversal_register(tmp, a):
    (tmp / "victim").mkdir()
    (tmp / "victim" / "x_1.npz").write_bytes(b"the user's own file")
    (tmp / "victim" / "x_1.nii.gz").write_bytes(b"the user's own file")
    return (
        _register(tmp, a, extra=("--disp-format", "learn2reg", "--pair-ids", "../victim/x", "1")),
        "--pair-ids",
        "not a plain id",
    )


def k_pair_ids_traversal_export(tmp, a):
    (tmp / "victim").mkdir()
    (tmp / "victim" / "x_1.npz").write_bytes(b"the user's own file")
    return (
        [
            "export",
            "--disp",
            a["disp"],
            "--fixed",
            a["f"],
            "--format",
            "learn2reg",
            "--pair-ids",
            "../../victim/x",
            "1",
            "--out-dir",
            tmp / "a" / "b",
        ],
        "--pair-ids",
        "not a plain id",
    )


def k_pair_ids_absolute(tmp, a):
    return _register(tmp, a, extra=("--disp-format", "learn2reg", "--pair-ids", str(tmp / "abs"), "1")), "--pair-ids", "'/"


def k_pair_ids_dotdot(tmp, a):
    return (
        [
            "export",
            "--disp",
            a["disp"],
            "--fixed",
            a["f"],
            "--format",
            "learn2reg",
            "--pair-ids",
            "..",
            "0001",
            "--out-dir",
            tmp / "x",
        ],
        "--pair-ids",
        "'..'",
    )


def k_stale_outputs_without_overwrite(tmp, a):
    (tmp / "out").mkdir()
    (tmp / "out" / "jacobian.nii.gz").write_bytes(b"an earlier run's Jacobian")
    return _register(tmp, a), "jacobian.nii.gz", "earlier run"


# silent garbage


def k_seg_shifted_30mm(tmp, a):
    affine = np.eye(4)
    affine[0, 3] = 30.0
    seg = _nifti(tmp / "seg.nii.gz", (_volume(5) * 4).astype(np.int16), affine)
    return _register(tmp, a, extra=("--moving-seg", seg)), "seg.nii.gz", "another grid"


def k_seg_other_shape(tmp, a):
    seg = _nifti(tmp / "seg.nii.gz", np.ones((32, 32, 30), np.int16))
    return _register(tmp, a, extra=("--moving-seg", seg)), "seg.nii.gz", "differs from the moving image"


def k_figure_fixed_seg_shifted(tmp, a):
    affine = np.eye(4)
    affine[2, 3] = -12.0
    seg = _nifti(tmp / "fseg.nii.gz", (_volume(5) * 4).astype(np.int16), affine)
    return (
        ["figure", "--model", a["model"], "--fixed", a["f"], "--moving", a["m"], "--fixed-seg", seg, "--out", tmp / "fig.png"],
        "fseg.nii.gz",
        "another grid",
    )


def k_moving_without_qform_or_sform(tmp, a):
    img = nib.Nifti1Image(_volume(1), None)
    img.header["qform_code"], img.header["sform_code"] = 0, 0
    nib.save(img, str(tmp / "noorient.nii.gz"))
    return _register(tmp, a, moving=tmp / "noorient.nii.gz"), "noorient.nii.gz", "neither a qform nor an sform"


def k_field_of_view_20_voxels(tmp, a):
    f = _nifti(tmp / "f20.nii.gz", _volume(0, (20, 20, 20)))
    m = _nifti(tmp / "m20.nii.gz", _volume(1, (20, 20, 20)))
    return _register(tmp, a, model=a["geo"], fixed=f, moving=m), "f20.nii.gz", "field of view too small"


def k_anisotropic_voxels(tmp, a):
    moving = _nifti(tmp / "thin.nii.gz", _volume(1), np.diag([0.1, 0.1, 5.0, 1.0]))
    return _register(tmp, a, moving=moving), "thin.nii.gz", "too anisotropic"


def k_labels_float_beyond_int64(tmp, a):
    seg = _nifti(tmp / "seg.nii.gz", np.full(SHAPE, 1e30, np.float32))
    return _register(tmp, a, extra=("--moving-seg", seg)), "seg.nii.gz", "beyond 64-bit integers"


def k_labels_uint64_beyond_int64(tmp, a):
    seg = _nifti(tmp / "seg.nii.gz", np.full(SHAPE, 2**64 - 5, np.uint64))
    return _register(tmp, a, extra=("--moving-seg", seg)), "seg.nii.gz", "beyond signed 64-bit"


# hand-edited model.json (schema)


def k_model_json_negative_resample_shape(tmp, a):
    folder = _edited_model(tmp, a, lambda s: s["preprocessing"].update(resample_shape=[-32, 32, 32]))
    return _register(tmp, a, model=folder), "model.json", "preprocessing.resample_shape[0]"


def k_model_json_huge_stored_shape(tmp, a):
    folder = _edited_model(tmp, a, lambda s: _geometry(s, stored_shape=[10**6, 32, 32]))
    return _register(tmp, a, model=folder), "model.json", "preprocessing.geometry.stored_shape[0]"


def k_model_json_stored_shape_1(tmp, a):
    folder = _edited_model(tmp, a, lambda s: _geometry(s, stored_shape=[1, 1, 1]))
    return _register(tmp, a, model=folder), "model.json", "preprocessing.geometry.stored_shape[0]"


def k_model_json_orientation_LLS(tmp, a):
    folder = _edited_model(tmp, a, lambda s: _geometry(s, orientation="LLS"))
    return _register(tmp, a, model=folder), "model.json", "preprocessing.geometry.orientation"


def k_model_json_zero_spacing(tmp, a):
    folder = _edited_model(tmp, a, lambda s: _geometry(s, spacing=[1.0, 0.0, 1.0]))
    return _register(tmp, a, model=folder), "model.json", "preprocessing.geometry.spacing[1]"


def k_model_json_unknown_field(tmp, a):
    folder = _edited_model(tmp, a, lambda s: s.update(my_note="hi"))
    return _register(tmp, a, model=folder), "model.json", "'my_note' is unknown"


def k_model_json_factor_is_text(tmp, a):
    folder = _edited_model(tmp, a, lambda s: s.update(factor="2"))
    return _register(tmp, a, model=folder), "model.json", "field 'factor'"


def k_model_json_missing_kind(tmp, a):
    folder = _edited_model(tmp, a, lambda s: s.pop("kind"))
    return _register(tmp, a, model=folder), "model.json", "'kind' is missing"


def k_model_json_nan_intensity(tmp, a):
    folder = _edited_model(tmp, a, lambda s: s["preprocessing"].update(intensity={"p1": 0.0, "p99": float("nan")}))
    return _register(tmp, a, model=folder), "model.json", "preprocessing.intensity.p99"


def k_model_json_reversed_percentiles(tmp, a):
    folder = _edited_model(tmp, a, lambda s: s["preprocessing"].update(percentiles=[99.5, 0.5]))
    return _register(tmp, a, model=folder), "model.json", "low < high"


def k_model_json_a_list(tmp, a):
    folder = _edited_model(tmp, a, lambda s: None, raw=b"[1, 2, 3]")
    return _register(tmp, a, model=folder), "model.json", "not a JSON object"


def k_model_json_bad_utf8(tmp, a):
    folder = _edited_model(tmp, a, lambda s: None, raw=b'{"format_version": 2, "label": "\xff\xfe"}')
    return _register(tmp, a, model=folder), "model.json", "unreadable model description"


def k_model_json_deep_nesting(tmp, a):
    folder = _edited_model(tmp, a, lambda s: None, raw=b"[" * 200000 + b"]" * 200000)
    return _register(tmp, a, model=folder), "model.json", "unreadable model description"


# crashes, hangs, resource bounds


def k_truncated_uncompressed_nii(tmp, a):
    path = Path(_nifti(tmp / "cut.nii", _volume(2)))
    path.write_bytes(path.read_bytes()[:20000])
    return _register(tmp, a, moving=path), "cut.nii", "truncated"


def k_header_claims_100_terabytes(tmp, a):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((30000, 30000, 30000))
    (tmp / "huge.nii.gz").write_bytes(zlib.compress(img.header.binaryblock + b"\0" * 4 + b"\0" * 256, wbits=31))
    return _register(tmp, a, fixed=tmp / "huge.nii.gz"), "huge.nii.gz", "header claims"


def k_gzip_bomb_claim(tmp, a):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((512, 512, 256))  # 256 MB claimed by a stream of a few hundred bytes
    (tmp / "bomb.nii.gz").write_bytes(zlib.compress(img.header.binaryblock + b"\0" * 4 + b"\0" * 4096, wbits=31))
    return _register(tmp, a, moving=tmp / "bomb.nii.gz"), "bomb.nii.gz", "gzip stream can hold"


def k_fifo_as_fixed(tmp, a):
    os.mkfifo(tmp / "pipe.nii.gz")
    return _register(tmp, a, fixed=tmp / "pipe.nii.gz"), "pipe.nii.gz", "is a FIFO"


def k_device_as_moving(tmp, a):
    return _register(tmp, a, moving="/dev/zero"), "/dev/zero", "not a regular file"


def k_fifo_as_pairs_csv(tmp, a):
    os.mkfifo(tmp / "pairs.csv")
    return ["register", "--model", a["model"], "--pairs", tmp / "pairs.csv", "--out-dir", tmp / "out"], "pairs.csv", "is a FIFO"


def k_fifo_as_config(tmp, a):
    os.mkfifo(tmp / "cfg.py")
    return ["evaluate", "--model", a["model"], "--config", tmp / "cfg.py", "--out-dir", tmp / "e"], "cfg.py", "is a FIFO"


def k_fifo_as_checkpoint(tmp, a):
    os.mkfifo(tmp / "ck.pth")
    return ["convert-official", "--checkpoint", tmp / "ck.pth", "--kind", "student", "--out", tmp / "conv"], "ck.pth", "is a FIFO"


def k_fifo_as_points(tmp, a):
    os.mkfifo(tmp / "pts.csv")
    return (
        ["apply", "--disp", a["disp"], "--reference", a["f"], "--points", tmp / "pts.csv", "--out", tmp / "moved.csv"],
        "pts.csv",
        "is a FIFO",
    )


def k_fifo_as_displacement(tmp, a):
    os.mkfifo(tmp / "d.nii.gz")
    return (
        ["export", "--disp", tmp / "d.nii.gz", "--fixed", a["f"], "--format", "itk", "--out-dir", tmp / "x"],
        "d.nii.gz",
        "is a FIFO",
    )


def k_truncated_displacement(tmp, a):
    path = Path(_nifti(tmp / "d.nii", np.zeros((*SHAPE, 3), np.float32)))
    path.write_bytes(path.read_bytes()[:5000])
    return ["export", "--disp", path, "--fixed", a["f"], "--format", "itk", "--out-dir", tmp / "x"], "d.nii", "truncated"


def k_points_not_numbers(tmp, a):
    (tmp / "pts.csv").write_text("1,2,3\n4,five,6\n")
    return (
        ["apply", "--disp", a["disp"], "--reference", a["f"], "--points", tmp / "pts.csv", "--out", tmp / "moved.csv"],
        "pts.csv",
        "line 2",
    )


def k_pairs_csv_latin1(tmp, a):
    (tmp / "pairs.csv").write_bytes("f\xe9.nii.gz,m.nii.gz\n".encode("latin-1"))
    return ["register", "--model", a["model"], "--pairs", tmp / "pairs.csv", "--out-dir", tmp / "out"], "pairs.csv", "UTF-8"


def k_evaluate_zero_timing_repeats(tmp, a):
    return (
        [
            "evaluate",
            "--model",
            a["model"],
            "--config",
            ROOT / "configs" / "synthetic_vm.py",
            "--timing-repeats",
            "0",
            "--out-dir",
            tmp / "e",
        ],
        "--timing-repeats",
        "between 1",
    )


def k_evaluate_negative_max_pairs(tmp, a):
    return (
        [
            "evaluate",
            "--model",
            a["model"],
            "--config",
            ROOT / "configs" / "synthetic_vm.py",
            "--max-pairs",
            "-3",
            "--out-dir",
            tmp / "e",
        ],
        "--max-pairs",
        "0 (every pair) or more",
    )


def k_out_dir_name_too_long(tmp, a):
    argv = _register(tmp, a)
    argv[argv.index("--out-dir") + 1] = tmp / ("o" * 300)
    return argv, "ooo", "too long"


KINDS = [v for k, v in sorted(globals().items()) if k.startswith("k_")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__[2:] for k in KINDS])
def test_refused_with_one_line_and_nothing_changed(tmp_path, assets, kind):
    argv, source, message = kind(tmp_path, assets)
    before = snapshot(tmp_path)
    proc = crd(argv, cwd=tmp_path, timeout=60)
    assert_one_line(proc, 2, "crd-jax: error: ", source, message)
    assert snapshot(tmp_path) == before


# --- train.py: config values checked before anything runs ----------------------------------------------------------

TRAIN_KINDS = {
    "lr_nan": (["--config.train.lr=nan"], "config.train.lr", "finite"),
    "lr_negative": (["--config.train.lr=-0.001"], "config.train.lr", "must be in (0"),
    "beta2_above_one": (["--config.train.b2=1.5"], "config.train.b2", "must be in [0"),
    "one_training_subject": (["--config.data.synthetic.train=1"], "config.data.synthetic.train", "[2,"),
    "resample_shape_zero": (["--config.data.resample_shape=(0,8,8)"], "config.data.resample_shape", "sides must be"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAIN_KINDS))
def test_train_py_refuses_bad_values_before_running(tmp_path, name):
    args, source, message = TRAIN_KINDS[name]
    before = snapshot(tmp_path)
    proc = train_py([*args, f"--config.workdir={tmp_path / 'wd'}"], cwd=tmp_path)
    assert_one_line(proc, 2, "error: ", source, message)
    assert snapshot(tmp_path) == before and not (tmp_path / "wd").exists()


def test_at_least_fifty_kinds():
    assert len(KINDS) + len(TRAIN_KINDS) + 12 >= 50  # + the cases below


# --- commands that succeed must leave the user's files alone and write a consistent set ----------------------------


@pytest.mark.slow
def test_register_overwrite_replaces_the_whole_set_and_keeps_64_bit_labels_on_a_flipped_grid(tmp_path, assets):
    """One run covers: --overwrite removes an earlier run's jacobian and affine files (no mixed set), keeps the
    user's notes, removes the staging folder a killed run left; the label map is stored with its x axis
    reversed (and the affine to match) and holds a label beyond int32, which survives exactly."""
    from crd_jax.registration.warping import warp_labels as warp_labels_exact

    out = tmp_path / "out"
    out.mkdir()
    for name in ("jacobian.nii.gz", "affine.txt", "warped.nii.gz"):
        (out / name).write_bytes(b"an earlier run")
    (out / "notes.txt").write_text("the user's notes")
    dead = subprocess.Popen(["true"])
    dead.wait()
    from crd_jax.outputs import host_tag

    stale = out / f".out.crd-jax-{host_tag()}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "warped.nii.gz").write_bytes(b"half written")
    big = 2**32 + 21
    labels = (_volume(7) * 5).astype(np.int64)
    labels[labels == 3] = big
    flipped = np.eye(4)
    flipped[0, 0], flipped[0, 3] = -1.0, SHAPE[0] - 1.0  # voxel i of the file is voxel 31 - i of the moving image
    seg = _nifti(tmp_path / "seg.nii.gz", labels[::-1].copy(), flipped)
    proc = crd(
        _register(tmp_path, assets, model=assets["shift"], extra=("--moving-seg", seg, "--overwrite", "--no-affine")),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "disp.nii.gz",
        "notes.txt",
        "registration.json",
        "warped.nii.gz",
        "warped_seg.nii.gz",
    ]  # the earlier affine.txt is gone
    assert (out / "notes.txt").read_text() == "the user's notes"
    warped_seg = np.asarray(nib.load(str(out / "warped_seg.nii.gz")).dataobj)
    disp = np.asarray(nib.load(str(out / "disp.nii.gz")).dataobj, np.float32)
    assert warped_seg.dtype == np.int64 and big in warped_seg
    np.testing.assert_array_equal(warped_seg, warp_labels_exact(labels, disp))  # as if stored on the image's grid


@pytest.mark.slow
def test_convert_overwrite_keeps_the_users_files_in_the_model_folder(tmp_path, assets):
    from test_cli import _random_official_state, _write_legacy

    folder = tmp_path / "model"
    shutil.copytree(assets["model"], folder)
    (folder / "notes.md").write_text("years of notes")
    old_params = (folder / "params.msgpack").read_bytes()
    _write_legacy(tmp_path / "student.pth", _random_official_state(False))
    proc = crd(
        ["convert-official", "--checkpoint", tmp_path / "student.pth", "--kind", "student", "--out", folder, "--overwrite"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "notes.md").read_text() == "years of notes"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "notes.md", "params.msgpack"]
    assert (folder / "params.msgpack").read_bytes() != old_params
    assert json.loads((folder / "model.json").read_text())["label"] == "VM-L-CRD (official)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "student.pth"]  # no staging folder left


def test_thread_count_is_capped_with_one_warning(tmp_path):
    proc = crd(["models"], cwd=tmp_path, env={"CRD_JAX_NUM_THREADS": "100000"})
    assert proc.returncode == 0
    assert_one_line(proc, 0, "CRD_JAX_NUM_THREADS=100000 capped at")
    code = (
        "import os; from crd_jax.cli.main import cap_thread_count; cap_thread_count(); print(os.environ['CRD_JAX_NUM_THREADS'])"
    )
    capped = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "CRD_JAX_NUM_THREADS": "100000"}
    )
    assert int(capped.stdout) == 4 * os.cpu_count()


@pytest.mark.slow
# --- the mechanisms, in this process ------------------------------------------------------------------------------


def test_output_names_must_be_plain_and_stale_staging_of_dead_processes_is_removed(tmp_path):
    from crd_jax.errors import InputError
    from crd_jax.outputs import OutputSet, Terminated, host_tag

    for bad in ("../x", "/etc/passwd", "..", "a/b", ""):
        with pytest.raises(InputError, match="not a plain file name"):
            OutputSet(tmp_path / "o", [bad])
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = host_tag()
    assert len(here) == 8 and here != "0badf00d"
    (tmp_path / f".o.crd-jax-{here}-{dead.pid}-zz9").mkdir()
    live = tmp_path / f".o.crd-jax-{here}-{os.getppid()}-zz9"  # a running process's: kept
    live.mkdir()
    # another machine's on a shared file system: its process id means nothing here, so it is kept, dead or not
    elsewhere = tmp_path / f".o.crd-jax-0badf00d-{dead.pid}-zz9"
    elsewhere.mkdir()
    with pytest.raises(Terminated):  # SIGTERM inside the block: the staging folder goes, nothing is written
        with OutputSet(tmp_path / "o", ["a.txt"]) as stage:
            assert stage.name.startswith(f".o.crd-jax-{here}-{os.getpid()}-")
            (stage / "a.txt").write_text("x")
            raise Terminated()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])


def test_images_are_read_into_memory_not_mapped(tmp_path):
    from crd_jax.data.io import load_image

    path = Path(_nifti(tmp_path / "a.nii", _volume(3)))
    vol = load_image(path)
    base = vol.data
    while base is not None:
        assert not isinstance(base, np.memmap)
        base = base.base if isinstance(base, np.ndarray) else None
    path.write_bytes(b"")  # truncated after reading: the array is unaffected (no SIGBUS)
    assert float(vol.data.sum()) > 0


def test_a_planted_cache_entry_is_never_unpickled(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from crd_jax import compile as cc

    monkeypatch.setenv("CRD_JAX_CACHE_DIR", str(tmp_path / "cache"))
    from crd_jax.user_cache import cache_folder

    marker = tmp_path / "owned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = cache_folder("executables")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    try:
        cc.cache_executables(folder)
        double = lambda x: 2 * x + 1  # noqa: E731
        assert float(cc.persistent_jit(double)(jnp.float32(3))) == 7.0
        entries = [p for p in Path(folder).iterdir() if p.suffix == ".exe"]
        assert entries and stat.S_IMODE(entries[0].stat().st_mode) == 0o600
        for entry in entries:  # the earlier format (a plain pickle), then our format with a forged tag
            entry.write_bytes(pickle.dumps(Evil()))
        assert float(cc.persistent_jit(double)(jnp.float32(3))) == 7.0 and not marker.exists()
        for entry in entries:
            body = pickle.dumps(Evil())
            entry.write_bytes(cc._MAGIC + hashlib.sha256(body).digest() + body)
        assert float(cc.persistent_jit(double)(jnp.float32(3))) == 7.0 and not marker.exists()
        key = (Path(folder) / ".key").read_bytes()  # a valid tag, but the entry is writable by others: refused
        for entry in entries:
            body = pickle.dumps(Evil())
            entry.write_bytes(cc._MAGIC + cc._sign(key, body) + body)
            entry.chmod(0o666)
        assert float(cc.persistent_jit(double)(jnp.float32(3))) == 7.0 and not marker.exists()
    finally:
        cc.cache_executables(None)


def test_cache_folders_are_private_whatever_the_umask(tmp_path, monkeypatch):
    from crd_jax.user_cache import cache_folder

    monkeypatch.setenv("CRD_JAX_CACHE_DIR", str(tmp_path / "c"))
    old = os.umask(0)
    try:
        path = cache_folder("xla")
        (tmp_path / "c" / "shapes").mkdir(mode=0o777)  # left world-writable by an earlier release: made private
        shapes = cache_folder("shapes")
    finally:
        os.umask(old)
    for p in (path, shapes, tmp_path / "c"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700


@pytest.mark.slow
@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_turns_caching_off_with_one_warning(tmp_path, monkeypatch, capsys):
    from crd_jax import user_cache

    monkeypatch.setenv("CRD_JAX_CACHE_DIR", str(tmp_path / "c"))
    (tmp_path / "c" / "executables").mkdir(parents=True, mode=0o700)
    os.chown(tmp_path / "c" / "executables", 65534, 65534)  # planted by "nobody"
    monkeypatch.setattr(user_cache, "_warned", set())
    assert user_cache.cache_folder("executables") is None
    assert user_cache.cache_folder("executables") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another user" in err[0] and "caching is off" in err[0]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    from crd_jax.training.checkpoint import StageCheckpointer

    like = {"w": np.zeros(4, np.float32), "step": np.int64(0)}
    ckpt = StageCheckpointer(tmp_path / "ckpt", keep=3)
    ckpt.save(1, {"w": np.full(4, 1.0, np.float32), "step": np.int64(1)})
    ckpt.save(2, {"w": np.full(4, 2.0, np.float32), "step": np.int64(2)})
    ckpt.close()
    for p in (tmp_path / "ckpt" / "2").rglob("*"):
        if p.is_file():
            p.write_bytes(b"\0garbage")
    warnings = []
    ckpt = StageCheckpointer(tmp_path / "ckpt", keep=3)
    step, state = ckpt.restore_latest(like, warn=warnings.append)
    ckpt.close()
    assert step == 1 and np.all(np.asarray(state["w"]) == 1.0)
    assert len(warnings) == 1 and "damaged" in warnings[0] and "resuming from step 1" in warnings[0]
    assert (tmp_path / "ckpt_damaged").is_dir() and not (tmp_path / "ckpt" / "2").exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_naming_stage_and_step(tmp_path):
    import jax.numpy as jnp

    from crd_jax.config import base_config
    from crd_jax.errors import InputError
    from crd_jax.training import distributed
    from crd_jax.training.logging import MetricLogger
    from crd_jax.training.loop import StageRun, train_stage

    class Loader:
        def iterate(self, start, stop, prefetch=2):
            for step in range(start, stop):
                x = np.full((2, 1), np.inf if step == 2 else 1.0, np.float32)  # the third step's batch
                yield step, {"x": x}

    cfg = base_config()
    cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.eval_every = 100, 4, 0
    run = StageRun("toy", lambda p, f, b: (jnp.mean(p["w"] * b["x"]), {}), {"w": jnp.ones((1,))}, {}, 10, tmp_path / "toy")
    with pytest.raises(InputError, match=r"stage toy: the loss became NaN/Inf at step 3") as info:
        train_stage(run, Loader(), distributed.data_mesh(), cfg, MetricLogger(None, enabled=False, progress=False))
    assert "no checkpoint was saved" in str(info.value) and not list((tmp_path / "toy" / "ckpt").glob("[0-9]*"))


def test_the_shared_assets_were_never_changed(assets):
    assert snapshot(assets["root"]) == assets["before"]
