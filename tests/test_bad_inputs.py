"""Bad input, tried as a new user would, over every command: each case must exit with status 2 (130 for
Ctrl-C), print exactly one line that names the file (or value) and the problem, print no traceback, and
leave the file system exactly as it was (a snapshot of the test's folder, before == after)."""

import errno
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax.cli import main as cli
from crd_jax.data import io as dio
from model_folders import make_model_folder
from crd_jax.model_io import save_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)


def _volume(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return ((v - v.min()) / np.ptp(v)).astype(np.float32)


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _model(path, normalize="minmax", p99=None):
    extra = {"intensity": {"p1": 0.0, "p99": p99, "max": 1.0}} if p99 is not None else {}
    return make_model_folder(path, SHAPE[0], normalize, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    good, params, spec = _model(root / "good")
    raw, _, _ = _model(root / "raw", normalize="none", p99=0.9)
    return {"good": good, "raw": raw, "params": params, "spec": spec, "root": root}


def snapshot(folder: Path):
    """Every path under ``folder`` with its type, mode and content hash."""
    state = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            state[rel] = ("dir", p.stat().st_mode)
        else:
            state[rel] = ("file", p.stat().st_mode, hashlib.sha1(p.read_bytes()).hexdigest())
    return state


# --- the cases: (name, setup(tmp, models) -> (argv, source, message[, status])) ------------------------------


def _pair(tmp):
    return _nifti(tmp / "f.nii.gz", _volume(0)), _nifti(tmp / "m.nii.gz", _volume(1))


def _register(tmp, models, fixed=None, moving=None, extra=(), model=None):
    f, m = _pair(tmp)
    return [
        "register",
        "--model",
        str(model or models["good"]),
        "--fixed",
        fixed or f,
        "--moving",
        moving or m,
        "--out-dir",
        str(tmp / "out"),
        *extra,
    ]


def c_missing_fixed(tmp, models):
    return _register(tmp, models, fixed=str(tmp / "nope.nii.gz")), "nope.nii.gz", "no such file"


def c_empty_file(tmp, models):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return _register(tmp, models, moving=str(tmp / "empty.nii.gz")), "empty.nii.gz", "unreadable"


def c_truncated_gzip(tmp, models):
    good = Path(_nifti(tmp / "t.nii.gz", _volume(2)))
    good.write_bytes(good.read_bytes()[:300])
    return _register(tmp, models, moving=str(good)), "t.nii.gz", "unreadable or truncated"


def c_text_as_nifti(tmp, models):
    (tmp / "text.nii").write_text("this is not an image\n" * 40)
    return _register(tmp, models, moving=str(tmp / "text.nii")), "text.nii", "unreadable"


def c_unknown_extension(tmp, models):
    (tmp / "img.txt").write_text("1 2 3")
    return _register(tmp, models, moving=str(tmp / "img.txt")), "img.txt", "unknown format"


def c_image_is_folder(tmp, models):
    (tmp / "dir.nii.gz").mkdir()
    return _register(tmp, models, moving=str(tmp / "dir.nii.gz")), "dir.nii.gz", "is a folder"


def c_2d_image(tmp, models):
    return _register(tmp, models, moving=_nifti(tmp / "2d.nii.gz", _volume(3, (32, 32)))), "2d.nii.gz", "expected a 3-D volume"


def c_4d_image(tmp, models):
    return (
        _register(tmp, models, moving=_nifti(tmp / "4d.nii.gz", np.zeros((32, 32, 32, 2), np.float32))),
        "4d.nii.gz",
        "expected a 3-D",
    )


def c_nan_voxels(tmp, models):
    v = _volume(4)
    v[3, 4, 5] = np.nan
    return _register(tmp, models, moving=_nifti(tmp / "nan.nii.gz", v)), "nan.nii.gz", "NaN/Inf voxels"


def c_inf_voxels(tmp, models):
    v = _volume(4)
    v[0, 0, 0] = np.inf
    return _register(tmp, models, fixed=_nifti(tmp / "inf.nii.gz", v)), "inf.nii.gz", "NaN/Inf voxels"


def c_non_integer_labels(tmp, models):
    seg = _nifti(tmp / "seg.nii.gz", _volume(5) * 3)
    return _register(tmp, models, extra=("--moving-seg", seg)), "seg.nii.gz", "non-integer"


def c_labels_other_shape(tmp, models):
    seg = _nifti(tmp / "seg.nii.gz", np.ones((30, 32, 32), np.int16))
    return _register(tmp, models, extra=("--moving-seg", seg)), "seg.nii.gz", "differs from the moving image"


def c_zero_voxel_size(tmp, models):
    img = nib.Nifti1Image(_volume(6), None)
    img.header["pixdim"][1:4] = [1.0, 0.0, 1.0]  # a zero voxel size, no qform/sform to override it
    img.header["qform_code"], img.header["sform_code"] = 0, 0
    nib.save(img, str(tmp / "zero.nii.gz"))
    return _register(tmp, models, moving=str(tmp / "zero.nii.gz")), "zero.nii.gz", "voxel size (1.0, 0.0, 1.0)"


def c_negative_voxel_size(tmp, models):
    img = nib.Nifti1Image(_volume(6), np.eye(4))
    img.header["pixdim"][1:4] = [1.0, 1.0, -2.0]
    nib.save(img, str(tmp / "neg.nii.gz"))
    return _register(tmp, models, moving=str(tmp / "neg.nii.gz")), "neg.nii.gz", "negative"


def c_singular_sform(tmp, models):
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]  # z maps onto x
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(_volume(6), None, header), str(tmp / "singular.nii.gz"))
    return _register(tmp, models, moving=str(tmp / "singular.nii.gz")), "singular.nii.gz", "degenerate geometry"


def c_tiny_image(tmp, models):
    return _register(tmp, models, moving=_nifti(tmp / "tiny.nii.gz", _volume(7, (8, 8, 8)))), "tiny.nii.gz", "too small"


def c_all_zero_moving(tmp, models):
    return _register(tmp, models, moving=_nifti(tmp / "zeros.nii.gz", np.zeros(SHAPE, np.float32))), "zeros.nii.gz", "constant"


def c_constant_fixed(tmp, models):
    return _register(tmp, models, fixed=_nifti(tmp / "const.nii.gz", np.full(SHAPE, 0.5, np.float32))), "const.nii.gz", "constant"


def c_no_world_overlap(tmp, models):
    far = np.eye(4)
    far[:3, 3] = [500.0, 0.0, 0.0]
    moving = _nifti(tmp / "far.nii.gz", _volume(8), far)
    return _register(tmp, models, moving=moving), "far.nii.gz", "mm apart"


def c_raw_intensities(tmp, models):
    moving = _nifti(tmp / "raw.nii.gz", _volume(9) * 4000.0)
    return _register(tmp, models, moving=moving, model=models["raw"]), "raw.nii.gz", "--normalize minmax"


def c_huge_header_claim(tmp, models):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((1024, 1024, 512))  # 2 GB of float32 claimed, 256 bytes stored
    hdr = img.header.binaryblock
    (tmp / "huge.nii").write_bytes(hdr + b"\0" * 4 + np.zeros(64, np.float32).tobytes())
    return _register(tmp, models, moving=str(tmp / "huge.nii")), "huge.nii", "unreadable"


def c_model_missing(tmp, models):
    return _register(tmp, models, model=tmp / "no_model"), "no_model", "no such model folder"


def c_model_not_a_model(tmp, models):
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("mine")
    return _register(tmp, models, model=tmp / "plain"), "plain", "not a crd-jax model folder"


def c_model_json_garbage(tmp, models):
    folder = tmp / "bad_json"
    save_model(folder, models["params"], models["spec"])
    (folder / "model.json").write_text("{not json")
    return _register(tmp, models, model=folder), "model.json", "unreadable model description"


def _damaged(tmp, models, payload):
    folder = tmp / "damaged"
    save_model(folder, models["params"], models["spec"])
    size = (folder / "params.msgpack").stat().st_size
    (folder / "params.msgpack").write_bytes(payload(size))
    return folder


def c_params_empty(tmp, models):
    return _register(tmp, models, model=_damaged(tmp, models, lambda n: b"")), "params.msgpack", "empty"


def c_params_random_bytes(tmp, models):
    folder = _damaged(tmp, models, lambda n: np.random.default_rng(0).bytes(n))
    return _register(tmp, models, model=folder), "params.msgpack", "damaged"


def c_params_zeroed_bytes(tmp, models):
    return _register(tmp, models, model=_damaged(tmp, models, lambda n: bytes(n))), "params.msgpack", "damaged"


def c_params_nan(tmp, models):
    params = jax.tree_util.tree_map(lambda x: np.full(np.shape(x), np.nan, np.float32), models["params"])
    save_model(tmp / "nanmodel", params, models["spec"])
    return _register(tmp, models, model=tmp / "nanmodel"), "params.msgpack", "NaN/Inf"


def c_params_all_zero(tmp, models):
    params = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), models["params"])
    save_model(tmp / "zeromodel", params, models["spec"])
    return _register(tmp, models, model=tmp / "zeromodel"), "params.msgpack", "all zero"


def c_params_other_architecture(tmp, models):
    spec = dict(models["spec"], architecture=dict(models["spec"]["architecture"], encoder=[8, 16, 16, 16, 16]))
    save_model(tmp / "mismatch", models["params"], spec)
    return _register(tmp, models, model=tmp / "mismatch"), "mismatch", "do not match"


def c_teacher_as_registrar_kind(tmp, models):
    save_model(tmp / "oddkind", models["params"], dict(models["spec"], kind="banana"))
    return _register(tmp, models, model=tmp / "oddkind"), "oddkind", "unusable model description"


def c_out_dir_is_file(tmp, models):
    (tmp / "out").write_text("keep me")
    return _register(tmp, models), "out", "is a file"


def c_out_dir_symlink_loop(tmp, models):
    os.symlink(tmp / "out", tmp / "out")
    return _register(tmp, models), "out", "symlink loop"


def c_out_dir_has_outputs(tmp, models):
    (tmp / "out").mkdir()
    (tmp / "out" / "warped.nii.gz").write_bytes(b"an earlier result")
    return _register(tmp, models), "warped.nii.gz", "--overwrite"


def c_out_dir_unwritable(tmp, models):
    argv = _register(tmp, models)
    argv[argv.index("--out-dir") + 1] = "/proc/crd_jax_out"
    return argv, "/proc/crd_jax_out", "not writable"


def c_out_dir_parent_is_file(tmp, models):
    (tmp / "afile").write_text("x")
    argv = _register(tmp, models)
    argv[argv.index("--out-dir") + 1] = str(tmp / "afile" / "sub")
    return argv, "sub", "is a file"


def c_export_nan(tmp, models):
    f = _nifti(tmp / "f.nii.gz", _volume(0))
    d = np.zeros((*SHAPE, 3), np.float32)
    d[1, 1, 1, 0] = np.nan
    disp = _nifti(tmp / "disp.nii.gz", d)
    return ["export", "--disp", disp, "--fixed", f, "--format", "itk", "--out-dir", str(tmp / "x")], "disp.nii.gz", "NaN/Inf"


def c_export_wrong_shape(tmp, models):
    f = _nifti(tmp / "f.nii.gz", _volume(0))
    disp = _nifti(tmp / "disp.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    return (
        ["export", "--disp", disp, "--fixed", f, "--format", "itk", "--out-dir", str(tmp / "x")],
        "disp.nii.gz",
        "expected a voxel displacement",
    )


def c_export_existing(tmp, models):
    f = _nifti(tmp / "f.nii.gz", _volume(0))
    disp = _nifti(tmp / "disp.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    (tmp / "x").mkdir()
    (tmp / "x" / "disp_itk.nii.gz").write_text("mine")
    return (
        ["export", "--disp", disp, "--fixed", f, "--format", "itk", "--out-dir", str(tmp / "x")],
        "disp_itk.nii.gz",
        "--overwrite",
    )


def c_convert_into_user_folder(tmp, models):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("years of work")
    (tmp / "ck.pth").write_bytes(b"whatever")
    return (
        ["convert-official", "--checkpoint", str(tmp / "ck.pth"), "--kind", "student", "--out", str(tmp / "mine"), "--overwrite"],
        "mine",
        "not a crd-jax model folder",
    )


def c_convert_over_model_without_overwrite(tmp, models):
    save_model(tmp / "converted", models["params"], models["spec"])
    (tmp / "ck.pth").write_bytes(b"whatever")
    return (
        ["convert-official", "--checkpoint", str(tmp / "ck.pth"), "--kind", "student", "--out", str(tmp / "converted")],
        "converted",
        "--overwrite",
    )


def c_convert_not_torch(tmp, models):
    (tmp / "ck.pth").write_bytes(b"\x80\x02}q\x00.")  # a pickle, but not torch's
    return (
        ["convert-official", "--checkpoint", str(tmp / "ck.pth"), "--kind", "student", "--out", str(tmp / "new")],
        "ck.pth",
        "not a PyTorch legacy checkpoint",
    )


def c_evaluate_missing_config(tmp, models):
    return (
        ["evaluate", "--model", str(models["good"]), "--config", str(tmp / "nope.py"), "--out-dir", str(tmp / "e")],
        "nope.py",
        "no such config file",
    )


def c_evaluate_broken_config(tmp, models):
    (tmp / "broken.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    return (
        ["evaluate", "--model", str(models["good"]), "--config", str(tmp / "broken.py"), "--out-dir", str(tmp / "e")],
        "broken.py",
        "does not load",
    )


def c_evaluate_data_root_is_file(tmp, models):
    (tmp / "cfg.py").write_text(
        "from crd_jax.config import base_config\n"
        "def get_config():\n    c = base_config()\n    c.data.kind = 'folder'\n"
        f"    c.data.root = {str(tmp / 'rootfile')!r}\n    return c\n"
    )
    (tmp / "rootfile").write_text("x")
    return (
        ["evaluate", "--model", str(models["good"]), "--config", str(tmp / "cfg.py"), "--out-dir", str(tmp / "e")],
        "rootfile",
        "not a folder",
    )


def c_figure_out_is_folder(tmp, models):
    f, m = _pair(tmp)
    (tmp / "fig.png").mkdir()
    return (
        ["figure", "--model", str(models["good"]), "--fixed", f, "--moving", m, "--out", str(tmp / "fig.png")],
        "fig.png",
        "is a folder",
    )


def c_figure_bad_suffix(tmp, models):
    f, m = _pair(tmp)
    return (
        ["figure", "--model", str(models["good"]), "--fixed", f, "--moving", m, "--out", str(tmp / "fig.txt")],
        "fig.txt",
        ".png or .pdf",
    )


def c_figure_existing(tmp, models):
    f, m = _pair(tmp)
    (tmp / "fig.png").write_bytes(b"my own figure")
    return (
        ["figure", "--model", str(models["good"]), "--fixed", f, "--moving", m, "--out", str(tmp / "fig.png")],
        "fig.png",
        "--overwrite",
    )


def c_figure_from_record_with_a_number_for_a_path(tmp, models):
    folder = tmp / "r1"
    folder.mkdir()
    (folder / "registration.json").write_text('{"fixed": 5, "moving": 6}')
    return ["figure", "--from", str(folder), "--out", str(tmp / "f.png")], "registration.json", "is not a file name"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("c_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[2:] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_changed(tmp_path, models, capsys, case):
    argv, source, message = case(tmp_path, models)
    before = snapshot(tmp_path)
    capsys.readouterr()
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("crd-jax: error: "), err
    assert source in err and message in err, err
    assert "Traceback" not in out + err
    assert snapshot(tmp_path) == before


def test_an_unwritable_log_file_is_said_once_in_a_fresh_process(tmp_path):
    """Before any handler was installed, Python's fallback handler printed the logged error a second time (only
    outside pytest, whose own handler catches it: hence a fresh process)."""
    import subprocess
    import sys

    for log in (tmp_path / "no such folder" / "log.txt", tmp_path):  # a missing folder; a folder
        cmd = [sys.executable, "-m", "crd_jax", "models", "--log", str(log)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"crd-jax: error: {log}: cannot write the log file"), lines
    assert list(tmp_path.iterdir()) == []


def test_at_least_forty_kinds():
    assert len(CASES) + len(TRAIN_CASES) + 4 >= 40  # + disk full, Ctrl-C, concurrent writers, read-only model


# --- failures in the middle of writing ---------------------------------------------------------------------


def _fail_on_second_write(monkeypatch, error):
    calls = {"n": 0}
    real = dio.save_nifti

    def flaky(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dio, "save_nifti", flaky)
    monkeypatch.setattr("crd_jax.interop.formats.save_nifti", flaky)
    monkeypatch.setattr("crd_jax.registration.writing.save_nifti", flaky)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.slow
def test_disk_full_while_writing_leaves_everything_as_it_was(tmp_path, models, capsys, monkeypatch, existing):
    argv = _register(tmp_path, models, extra=("--overwrite",))
    if existing:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "warped.nii.gz").write_bytes(b"previous result")
    before = snapshot(tmp_path)
    _fail_on_second_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left" in err and "out" in err, err
    assert snapshot(tmp_path) == before


def test_ctrl_c_while_writing_exits_130_and_leaves_everything_as_it_was(tmp_path, models, capsys, monkeypatch):
    argv = _register(tmp_path, models)
    before = snapshot(tmp_path)
    _fail_on_second_write(monkeypatch, KeyboardInterrupt())
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("signum, status, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_an_interrupt_a_callback_swallows_still_cancels_the_outputs(tmp_path, models, capsys, monkeypatch, signum, status, word):
    """A real signal whose exception a callback swallows (as JAX's garbage-collection hook did: the run went on
    and wrote everything with status 0): the command line's handler recorded it, so nothing lands."""
    import signal

    argv = _register(tmp_path, models)
    before = snapshot(tmp_path)
    real = dio.save_nifti

    def swallowing(path, *args, **kwargs):
        try:
            os.kill(os.getpid(), getattr(signal, signum))  # the handler runs here and raises ...
        except BaseException:  # ... and a callback ignores it
            pass
        return real(path, *args, **kwargs)

    for target in ("crd_jax.data.io.save_nifti", "crd_jax.interop.formats.save_nifti", "crd_jax.registration.writing.save_nifti"):
        monkeypatch.setattr(target, swallowing)
    # a user's terminal delivers Ctrl-C; a test worker started in the background inherits SIGINT ignored, which the
    # command keeps (test_an_ignored_sigint_stays_ignored_while_a_command_runs), so the worker's setting is replaced
    # (conftest's _signal_handlers_restored puts it back after the test)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status_seen = cli.main(argv)
    assert status_seen == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err
    assert snapshot(tmp_path) == before
    # the signal was this command's: a library call after it in this process writes as usual
    from crd_jax.outputs import OutputSet, noted_signal

    assert noted_signal() is None
    with OutputSet(tmp_path / "later", ["a.txt"]) as stage:
        (stage / "a.txt").write_text("x")
    assert (tmp_path / "later" / "a.txt").read_text() == "x"


def test_a_model_folder_does_not_land_after_an_interrupt(tmp_path):
    """finetune and convert-official write through save_model, not an output set: it asks too, so an interrupt
    a callback swallowed cannot leave a model behind a "nothing was written"."""
    import signal

    from crd_jax import outputs

    outputs.note_signal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_model(tmp_path / "m", {"w": np.zeros(2, np.float32)}, {"kind": "registrar"})
    finally:
        outputs.clear_noted_signals()
    assert list(tmp_path.iterdir()) == []
    save_model(tmp_path / "m", {"w": np.zeros(2, np.float32)}, {"kind": "registrar"})  # without one: written
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "params.msgpack"]


def test_an_ignored_sigint_stays_ignored_while_a_command_runs(monkeypatch):
    """A background job of a shell (or a test worker) inherits SIGINT ignored: Ctrl-C is meant for its parent."""
    import signal

    from crd_jax.cli import models

    seen = []
    monkeypatch.setattr(
        models, "run", lambda args: seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # restored after the test (conftest's _signal_handlers_restored)
    assert cli.main(["models"]) == 0
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert seen[0][0] is signal.SIG_IGN and seen[0][1] is cli._raise_for_signal  # SIGTERM still ends it cleanly


def test_an_interrupt_that_surfaces_as_an_import_error_is_an_interrupt(capsys, monkeypatch):
    """Ctrl-C while an extension module initialises (JAX is imported inside the subcommand) surfaces as an
    ImportError raised while handling the KeyboardInterrupt: one line and 130, not a traceback."""
    from crd_jax.cli import models

    def importing(args):
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt:
            raise ImportError("Encountered an error while initializing the extension")

    monkeypatch.setattr(models, "run", importing)
    assert cli.main(["models"]) == 130
    err = capsys.readouterr().err
    assert err == "crd-jax: interrupted; nothing was written\n"
    monkeypatch.setattr(models, "run", lambda args: (_ for _ in ()).throw(ImportError("not an interrupt")))
    with pytest.raises(ImportError, match="not an interrupt"):  # a real failure stays one
        cli.main(["models"])


def test_two_registers_into_one_folder_at_once(tmp_path, models, capsys):
    argv = _register(tmp_path, models)
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(cli.main(list(argv)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [0, 2]
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "affine.txt",
        "affine_itk.txt",
        "disp.nii.gz",
        "registration.json",
        "warped.nii.gz",
    ]


def test_read_only_model_folder_and_sheared_affine_register(tmp_path, models, capsys):
    folder = tmp_path / "ro_model"
    save_model(folder, models["params"], models["spec"])
    shear = np.eye(4)
    shear[0, 1] = 0.3
    f = _nifti(tmp_path / "f.nii.gz", _volume(0), shear)
    m = _nifti(tmp_path / "m.nii.gz", _volume(1), shear)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        before = snapshot(folder)
        assert cli.main(["register", "--model", str(folder), "--fixed", f, "--moving", m, "--out-dir", str(tmp_path / "o")]) == 0
        assert snapshot(folder) == before
    finally:
        for p in [folder, *folder.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert nib.load(str(tmp_path / "o" / "warped.nii.gz")).affine[0, 1] == pytest.approx(0.3)


def test_outputs_respect_the_umask(tmp_path, models, capsys):
    old = os.umask(0o027)
    try:
        import crd_jax.outputs as outputs

        outputs._UMASK = None
        assert cli.main(_register(tmp_path, models)) == 0
    finally:
        os.umask(old)
        outputs._UMASK = None
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "warped.nii.gz").stat().st_mode & 0o777 == 0o640


def test_convert_never_deletes_a_user_folder_and_overwrite_replaces_only_models(tmp_path, models, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.csv").write_text("1,2")
    from crd_jax.errors import InputError

    with pytest.raises(InputError, match="not a crd-jax model folder"):
        save_model(user, models["params"], models["spec"], overwrite=True)
    assert (user / "data.csv").read_text() == "1,2"
    save_model(tmp_path / "m", models["params"], models["spec"])
    save_model(tmp_path / "m", models["params"], dict(models["spec"], label="new"), overwrite=True)
    assert '"label": "new"' in (tmp_path / "m" / "model.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine"]  # no staging folders left


# --- train.py ----------------------------------------------------------------------------------------------


def t_missing_config(tmp):
    return ["--config=" + str(tmp / "nope.py")], "nope.py", "no such config file"


def t_unknown_field(tmp):
    return ["--config.train.nope=1"], "--config.train.nope", "no field 'nope'"


def t_stage_field_typo(tmp):
    return ["--config.stages.vm_l_crd.teachr=fst"], "teachr", "did you mean 'teacher'"


def t_bad_value(tmp):
    return ["--config.train.batch_size=abc"], "batch_size", "invalid literal"


def t_batch_zero(tmp):
    return ["--config.train.batch_size=0", f"--config.workdir={tmp / 'wd'}"], "batch_size", "positive integer"


def t_workdir_is_file(tmp):
    (tmp / "wdfile").write_text("x")
    return [f"--config.workdir={tmp / 'wdfile'}"], "wdfile", "workdir is a file"


def t_workdir_foreign(tmp):
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "paper.pdf").write_text("x")
    return [f"--config.workdir={tmp / 'foreign'}"], "foreign", "not a crd-jax workdir"


def t_data_root_is_file(tmp):
    (tmp / "rootfile").write_text("x")
    return (
        [
            "--config=" + str(ROOT / "configs" / "lpba40_vm.py"),
            f"--config.data.root={tmp / 'rootfile'}",
            f"--config.workdir={tmp / 'wd'}",
        ],
        "rootfile",
        "not a folder",
    )


def t_labels_none_with_a_stage_that_evaluates(tmp):
    (tmp / "data" / "images").mkdir(parents=True)
    for i in range(3):
        data = np.random.default_rng(i).random((16, 16, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp / "data" / "images" / f"s{i}.nii.gz")
    args = ["--config.data.kind=folder", f"--config.data.root={tmp / 'data'}", "--config.data.labels=none"]
    return [*args, "--config.data.splits.train=0:3", f"--config.workdir={tmp / 'wd'}"], "data.labels", "scores nothing"


TRAIN_CASES = [v for k, v in sorted(globals().items()) if k.startswith("t_")]


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.__name__[2:] for c in TRAIN_CASES])
def test_train_py_bad_input(tmp_path, case):
    args, source, message = case(tmp_path)
    before = snapshot(tmp_path)
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and source in lines[0] and message in lines[0], r.stderr
    assert snapshot(tmp_path) == before
