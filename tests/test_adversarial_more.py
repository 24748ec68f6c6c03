"""More adversarial inputs (reliability, round 2, the suite's second half): every command — ``register``,
``apply``, ``export``, ``figure``, ``evaluate``, ``models``, ``convert-official``, ``finetune``, ``--version``
and ``train.py`` — given what users hand it by mistake: empty or zero-byte files, folders where files are
expected, symlink loops, unreadable files, NaN/Inf voxels, 4-D and 2-D images, absurd voxel sizes, shear,
output paths that are files or sit in read-only folders, malformed pairs and point files, config overrides
of the wrong type, unknown options, a 2-D model given 3-D options, a fine-tuning folder of one scan or of
label maps that do not match.

Each kind is its own fresh subprocess and is held to the contract of tests/test_adversarial.py: exit status 2
(or a documented success), exactly one line on stderr naming the file or option and the problem, no
traceback, every file that existed before byte-identical afterwards and nothing new left behind.
Kinds refused before a model is loaded run in the quick tier; the others are marked slow.
Kinds that cannot run here (a full disk, another user's files) are in benchmarks/adversarial_extra.sh."""

import gzip
import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_adversarial import (
    ROOT,
    SHAPE,
    _nifti,
    _register,
    _volume,
    assert_one_line,
    assets,  # noqa: F401
    crd,
    snapshot,
)

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
CONFIG = ROOT / "configs" / "synthetic_vm.py"


@dataclass
class Case:
    argv: list
    needles: tuple
    tool: str = "crd"  # or "train"
    status: int = 2
    env: dict = field(default_factory=dict)
    stdout: str = ""  # a success: this text on stdout
    writes: tuple = ()  # a success: the new paths it writes (relative to the test's folder), complete


def refused(argv, *needles, **kw):
    return Case(list(argv), ("crd-jax",) + needles, **kw)


def train_refused(args, *needles):
    return Case(list(args), ("error: ",) + needles, tool="train")


def _needs_permissions():
    if ROOT_USER:
        pytest.skip("permissions do not bind root (benchmarks/adversarial_extra.sh runs this as another user)")


@pytest.fixture(scope="module")
def more(tmp_path_factory, assets):  # noqa: F811 (the fixture imported above)
    """A 2-D model folder, beside test_adversarial's 3-D assets."""
    import jax
    import jax.numpy as jnp

    from crd_jax.interop import official
    from crd_jax.model_io import save_model
    from crd_jax.models.build import model_from_spec

    root = tmp_path_factory.mktemp("more")
    arch = official.ARCHITECTURE | {"fusion": "paper", "teacher_align_corners": False}
    pre = {"normalize": "minmax", "percentiles": [0.5, 99.5], "resample_shape": [], "multiple": 32, "ndim": 2}
    spec = {
        "kind": "registrar",
        "factor": 2,
        "architecture": arch,
        "label": "VM-L 2-D (test)",
        "stage": "test",
        "preprocessing": pre,
    }
    x = jnp.zeros((1, 32, 32, 1))
    save_model(root / "model2d", model_from_spec(spec).init(jax.random.PRNGKey(0), x, x), spec)
    m = {
        **assets,
        "model2d": root / "model2d",
        "f2d": _nifti(root / "f2d.nii.gz", _volume(0, (32, 32))),
        "m2d": _nifti(root / "m2d.nii.gz", _volume(1, (32, 32))),
    }
    m["more_root"], m["more_before"] = root, snapshot(root)
    return m


def _reg(tmp, a, **kw):
    extra = kw.pop("extra", ())
    return _register(tmp, a, extra=extra, **kw)


def _apply(tmp, a, *extra, disp=None, reference=None, out=None):
    return ["apply", "--disp", disp or a["disp"], "--reference", reference or a["f"], "--out", out or tmp / "w.nii.gz", *extra]


def _export(tmp, a, *extra, disp=None, fixed=None, fmt="itk"):
    return ["export", "--disp", disp or a["disp"], "--fixed", fixed or a["f"], "--format", fmt, *extra]


def _figure(tmp, a, *extra, out=None):
    return ["figure", "--model", a["model"], "--fixed", a["f"], "--moving", a["m"], "--out", out or tmp / "fig.png", *extra]


def _evaluate(tmp, a, *extra, config=CONFIG):
    return ["evaluate", "--model", a["model"], "--config", config, "--out-dir", tmp / "e", *extra]


def _convert(tmp, ckpt, *extra, kind="student"):
    return ["convert-official", "--checkpoint", ckpt, "--kind", kind, "--out", tmp / "conv", *extra]


def _finetune(tmp, a, *extra, images=None):
    return ["finetune", "--model", a["geo"], "--images", images or tmp / "scans", "--out", tmp / "tuned", "--steps", "2", *extra]


def _scans(tmp, n=3, shape=SHAPE, labels=None):
    (tmp / "scans").mkdir()
    for i in range(n):
        _nifti(tmp / "scans" / f"s{i}.nii.gz", _volume(i, shape))
    if labels is not None:
        (tmp / "labels").mkdir()
        for i, lab_shape in enumerate(labels):
            _nifti(tmp / "labels" / f"s{i}.nii.gz", (_volume(10 + i, lab_shape) * 4).astype(np.int16))


def _image(tmp, name, data=None, affine=None):
    return _nifti(tmp / name, _volume(3) if data is None else data, affine)


def _pairs(tmp, a, text, name="pairs.csv"):
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["register", "--model", a["model"], "--pairs", path, "--out-dir", tmp / "out"]


def _points(tmp, a, text):
    (tmp / "pts.csv").write_bytes(text.encode())
    return _apply(tmp, a, "--points", tmp / "pts.csv", out=tmp / "moved.csv")


# --- the kinds: k_<command>_<what>(tmp, assets) -> Case ------------------------------------------------------------
# command line: unknown options and subcommands, missing and malformed values (argparse), --version


def k_cli_no_subcommand(tmp, a):
    return refused([], "required")


def k_cli_unknown_subcommand(tmp, a):
    return refused(["regster"], "invalid choice", "'regster'")


def k_cli_unknown_option(tmp, a):
    return refused([*_reg(tmp, a), "--bogus"], "unrecognized arguments: --bogus")


def k_cli_register_missing_out_dir(tmp, a):
    return refused(["register", "--fixed", a["f"], "--moving", a["m"]], "--out-dir")


def k_cli_io_steps_not_a_number(tmp, a):
    return refused(_reg(tmp, a, extra=("--io-steps", "many")), "--io-steps", "'many'")


def k_cli_bad_disp_format(tmp, a):
    return refused(_reg(tmp, a, extra=("--disp-format", "mha")), "--disp-format", "'mha'")


def k_cli_pair_ids_one_value(tmp, a):
    return refused(_export(tmp, a, "--pair-ids", "1", "--out-dir", tmp / "x", fmt="learn2reg"), "--pair-ids")


def k_cli_pair_ids_three_values(tmp, a):
    return refused(_export(tmp, a, "--pair-ids", "1", "2", "3", "--out-dir", tmp / "x", fmt="learn2reg"), "unrecognized", "3")


def k_cli_models_extra_argument(tmp, a):
    return refused(["models", "lpba40"], "unrecognized arguments: lpba40")


def k_cli_evaluate_max_pairs_float(tmp, a):
    return refused(_evaluate(tmp, a, "--max-pairs", "2.5"), "--max-pairs", "'2.5'")


def k_cli_finetune_lr_text(tmp, a):
    return refused(_finetune(tmp, a, "--lr", "fast"), "--lr", "'fast'")


def k_cli_convert_kind_unknown(tmp, a):
    argv = ["convert-official", "--checkpoint", tmp / "x.pth", "--kind", "pupil", "--out", tmp / "c"]
    return refused(argv, "--kind", "'pupil'")


def k_cli_version_succeeds_and_writes_nothing(tmp, a):
    return Case(["--version"], (), status=0, stdout="crd-jax ")


def k_cli_thread_count_not_a_number(tmp, a):
    return Case(
        ["models"],
        ("CRD_JAX_NUM_THREADS='lots' is not a number",),
        status=0,
        env={"CRD_JAX_NUM_THREADS": "lots"},
        stdout="lpba40-vm-ll-crd",
    )


# register: input files


def k_register_empty_fixed(tmp, a):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return refused(_reg(tmp, a, fixed=tmp / "empty.nii.gz"), "empty.nii.gz")


def k_register_zero_byte_uncompressed(tmp, a):
    (tmp / "empty.nii").write_bytes(b"")
    return refused(_reg(tmp, a, moving=tmp / "empty.nii"), "empty.nii")


def k_register_gz_of_nothing(tmp, a):
    (tmp / "nothing.nii.gz").write_bytes(gzip.compress(b""))
    return refused(_reg(tmp, a, moving=tmp / "nothing.nii.gz"), "nothing.nii.gz")


def k_register_gz_that_is_text(tmp, a):
    (tmp / "text.nii.gz").write_text("this is not an image\n")
    return refused(_reg(tmp, a, fixed=tmp / "text.nii.gz"), "text.nii.gz")


def k_register_folder_as_fixed(tmp, a):
    (tmp / "scan.nii.gz").mkdir()
    return refused(_reg(tmp, a, fixed=tmp / "scan.nii.gz"), "scan.nii.gz", "is a folder")


def k_register_symlink_loop(tmp, a):
    os.symlink(tmp / "loop_b.nii.gz", tmp / "loop_a.nii.gz")
    os.symlink(tmp / "loop_a.nii.gz", tmp / "loop_b.nii.gz")
    return refused(_reg(tmp, a, moving=tmp / "loop_a.nii.gz"), "loop_a.nii.gz")


def k_register_dangling_symlink(tmp, a):
    os.symlink(tmp / "gone.nii.gz", tmp / "link.nii.gz")
    return refused(_reg(tmp, a, moving=tmp / "link.nii.gz"), "link.nii.gz", "no such file")


def k_register_unreadable_moving(tmp, a):
    _needs_permissions()
    path = Path(_image(tmp, "locked.nii.gz"))
    path.chmod(0)
    return refused(_reg(tmp, a, moving=path), "locked.nii.gz")


def k_register_unknown_extension(tmp, a):
    (tmp / "scan.mha").write_bytes(b"ObjectType = Image\n")
    return refused(_reg(tmp, a, fixed=tmp / "scan.mha"), "scan.mha")


def k_register_nan_voxels(tmp, a):
    data = _volume(3)
    data[4:8, 4:8, 4:8] = np.nan
    return refused(_reg(tmp, a, fixed=_image(tmp, "nan.nii.gz", data)), "nan.nii.gz", "NaN")


def k_register_inf_voxels(tmp, a):
    data = _volume(3)
    data[0, 0, 0] = np.inf
    return refused(_reg(tmp, a, moving=_image(tmp, "inf.nii.gz", data)), "inf.nii.gz", "Inf")


def k_register_4d_image(tmp, a):
    return refused(_reg(tmp, a, moving=_image(tmp, "4d.nii.gz", np.stack([_volume(1)] * 2, -1))), "4d.nii.gz")


def k_register_2d_image_to_3d_model(tmp, a):
    return refused(_reg(tmp, a, moving=_image(tmp, "slice.nii.gz", _volume(1, (32, 32)))), "slice.nii.gz")


def k_register_complex_voxels(tmp, a):
    return refused(_reg(tmp, a, moving=_image(tmp, "cplx.nii.gz", _volume(1).astype(np.complex64))), "cplx.nii.gz")


def k_register_huge_voxels(tmp, a):
    return refused(
        _reg(tmp, a, moving=_image(tmp, "km.nii.gz", affine=np.diag([1e6, 1e6, 1e6, 1.0]))), "km.nii.gz", "above 100 mm"
    )


def k_register_zero_voxel_size(tmp, a):
    img = nib.Nifti1Image(_volume(0), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # nibabel cannot write such a qform
    img.header["pixdim"][1:4] = [1.0, 0.0, 1.0]
    nib.save(img, str(tmp / "flat.nii.gz"))
    return refused(_reg(tmp, a, fixed=tmp / "flat.nii.gz"), "flat.nii.gz", "zero")


def k_register_tiny_voxels(tmp, a):
    return refused(_reg(tmp, a, fixed=_image(tmp, "nm.nii.gz", affine=np.diag([1e-6, 1e-6, 1e-6, 1.0]))), "nm.nii.gz")


def k_register_shear_heavy_affine(tmp, a):
    affine = np.eye(4)
    affine[0, 1] = affine[1, 2] = 25.0
    return refused(_reg(tmp, a, moving=_image(tmp, "sheared.nii.gz", affine=affine)), "sheared.nii.gz")


def k_register_nan_affine(tmp, a):
    img = nib.Nifti1Image(_volume(1), np.eye(4))
    img.header["srow_x"] = [np.nan, 0, 0, 0]
    img.header.set_sform(None, code=1)
    nib.save(img, str(tmp / "nanaff.nii.gz"))
    raw = bytearray(gzip.decompress((tmp / "nanaff.nii.gz").read_bytes()))
    raw[280:284] = np.float32(np.nan).tobytes()  # srow_x[0]
    (tmp / "nanaff.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    return refused(_reg(tmp, a, moving=tmp / "nanaff.nii.gz"), "nanaff.nii.gz")


def k_register_npz_without_an_array(tmp, a):
    np.savez(tmp / "scan.npz")
    return refused(_reg(tmp, a, fixed=tmp / "scan.npz"), "scan.npz")


def k_register_moving_seg_4d(tmp, a):
    seg = _image(tmp, "seg4.nii.gz", np.ones((*SHAPE, 2), np.int16))
    return refused(_reg(tmp, a, extra=("--moving-seg", seg)), "seg4.nii.gz")


def k_register_moving_seg_nan(tmp, a):
    data = np.ones(SHAPE, np.float32)
    data[1, 1, 1] = np.nan
    return refused(_reg(tmp, a, extra=("--moving-seg", _image(tmp, "segnan.nii.gz", data))), "segnan.nii.gz")


def k_register_moving_seg_fractional(tmp, a):
    seg = _image(tmp, "segfrac.nii.gz", (_volume(4) * 3).astype(np.float32))
    return refused(_reg(tmp, a, extra=("--moving-seg", seg)), "segfrac.nii.gz")


def k_register_constant_fixed(tmp, a):
    return refused(_reg(tmp, a, fixed=_image(tmp, "const.nii.gz", np.zeros(SHAPE, np.float32))), "const.nii.gz")


# register: outputs and options


def k_register_out_dir_is_a_file(tmp, a):
    (tmp / "out").write_text("a file where the folder should go")
    return refused(_reg(tmp, a), "out", "output folder is a file")


def k_register_out_dir_in_read_only_folder(tmp, a):
    _needs_permissions()
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    argv = _reg(tmp, a)
    argv[argv.index("--out-dir") + 1] = tmp / "ro" / "out"
    return refused(argv, "ro")


def k_register_out_dir_under_a_file(tmp, a):
    (tmp / "afile").write_text("x")
    argv = _reg(tmp, a)
    argv[argv.index("--out-dir") + 1] = tmp / "afile" / "out"
    return refused(argv, "afile")


def k_register_negative_io_steps(tmp, a):
    return refused(_reg(tmp, a, extra=("--io-steps", "-5")), "--io-steps", "0 or more")


def k_register_model_missing(tmp, a):
    return refused(_reg(tmp, a, model=tmp / "nomodel"), "nomodel")


def k_register_model_is_a_file(tmp, a):
    (tmp / "model.msgpack").write_bytes(b"\0" * 10)
    return refused(_reg(tmp, a, model=tmp / "model.msgpack"), "model.msgpack")


def k_register_model_without_params(tmp, a):
    shutil.copytree(a["model"], tmp / "noparams")
    (tmp / "noparams" / "params.msgpack").unlink()
    return refused(_reg(tmp, a, model=tmp / "noparams"), "params.msgpack")


def k_register_model_params_truncated(tmp, a):
    shutil.copytree(a["model"], tmp / "cut")
    p = tmp / "cut" / "params.msgpack"
    p.write_bytes(p.read_bytes()[:1000])
    return refused(_reg(tmp, a, model=tmp / "cut"), "params.msgpack")


def k_register_model_params_of_another_model(tmp, a):
    shutil.copytree(a["model"], tmp / "mixed")
    shutil.copy(a["model2d"] / "params.msgpack", tmp / "mixed" / "params.msgpack")
    return refused(_reg(tmp, a, model=tmp / "mixed"), "mixed")


def k_register_model_folder_unreadable(tmp, a):
    _needs_permissions()
    shutil.copytree(a["model"], tmp / "locked")
    (tmp / "locked").chmod(0o311)  # listable by nobody: Path.exists() on its model.json raised PermissionError
    return refused(_reg(tmp, a, model=tmp / "locked"), "locked", "cannot be read")


def k_register_model_json_empty(tmp, a):
    shutil.copytree(a["model"], tmp / "blank")
    (tmp / "blank" / "model.json").write_bytes(b"")
    return refused(_reg(tmp, a, model=tmp / "blank"), "model.json")


def k_register_model_json_wrong_type_ndim(tmp, a):
    shutil.copytree(a["model"], tmp / "typed")
    spec = json.loads((tmp / "typed" / "model.json").read_text())
    spec["preprocessing"]["ndim"] = "3"
    (tmp / "typed" / "model.json").write_text(json.dumps(spec))
    return refused(_reg(tmp, a, model=tmp / "typed"), "model.json", "preprocessing.ndim")


# a 2-D model given 3-D images and 3-D options


def k_register_2d_model_3d_images(tmp, a):
    return refused(_reg(tmp, a, model=a["model2d"]), "f.nii.gz")


def k_register_2d_model_itk_format(tmp, a):
    return refused(
        _reg(tmp, a, model=a["model2d"], fixed=a["f2d"], moving=a["m2d"], extra=("--disp-format", "itk")),
        "--disp-format itk",
        "this model is 2-D",
    )


def k_register_2d_model_with_the_affine_step_succeeds(tmp, a):
    """Was a traceback (affine.txt from a 2-D map); the affine step is on by default."""
    return Case(
        _reg(tmp, a, model=a["model2d"], fixed=a["f2d"], moving=a["f2d"]),
        (),
        status=0,
        stdout="registered",
        writes=("out", "out/"),
    )


def k_register_2d_model_3d_seg(tmp, a):
    seg = _image(tmp, "seg3d.nii.gz", np.ones(SHAPE, np.int16))
    return refused(_reg(tmp, a, model=a["model2d"], fixed=a["f2d"], moving=a["m2d"], extra=("--moving-seg", seg)), "seg3d.nii.gz")


def k_figure_2d_model_3d_images(tmp, a):
    argv = _figure(tmp, a)
    argv[argv.index("--model") + 1] = a["model2d"]
    return refused(argv, "f.nii.gz")


# register --pairs: the pairs file


def k_pairs_bom_names_the_file_not_the_bom(tmp, a):
    return refused(_pairs(tmp, a, "\ufeffmissing_f.nii.gz,m.nii.gz\n"), "/missing_f.nii.gz: no such file")


def k_pairs_crlf_names_the_file_without_cr(tmp, a):
    return refused(_pairs(tmp, a, f"{a['f']},{a['m']}\r\n{a['f']},gone.nii.gz\r\n"), "gone.nii.gz: no such file")


def k_pairs_blank_lines_only(tmp, a):
    return refused(_pairs(tmp, a, "\n\n  \n,\n"), "pairs.csv", "no pairs")


def k_pairs_empty_file(tmp, a):
    return refused(_pairs(tmp, a, b""), "pairs.csv", "no pairs")


def k_pairs_duplicate_rows(tmp, a):
    return refused(_pairs(tmp, a, f"{a['f']},{a['m']}\n{a['f']},{a['m']}\n"), "pairs.csv", "row 2", "repeated")


def k_pairs_missing_column(tmp, a):
    return refused(_pairs(tmp, a, f"{a['f']}\n"), "pairs.csv", "row 1")


def k_pairs_extra_columns(tmp, a):
    return refused(_pairs(tmp, a, f"{a['f']},{a['m']},,name,extra\n"), "pairs.csv", "row 1")


def k_pairs_nonexistent_paths(tmp, a):
    return refused(_pairs(tmp, a, "nope_f.nii.gz,nope_m.nii.gz\n"), "nope_f.nii.gz", "no such file")


def k_pairs_name_traversal(tmp, a):
    return refused(_pairs(tmp, a, f"{a['f']},{a['m']},,../escape\n"), "pairs.csv", "'../escape'")


def k_pairs_is_a_folder(tmp, a):
    (tmp / "pairs.csv").mkdir()
    return refused(["register", "--model", a["model"], "--pairs", tmp / "pairs.csv", "--out-dir", tmp / "out"], "is a folder")


def k_pairs_and_fixed_together(tmp, a):
    (tmp / "pairs.csv").write_text(f"{a['f']},{a['m']}\n")
    return refused([*_reg(tmp, a), "--pairs", tmp / "pairs.csv"], "--pairs", "not both")


def k_pairs_second_pair_bad_first_pair_complete(tmp, a):
    """Documented: each pair's files appear at once when it is done; a bad pair stops the run with one line,
    the pairs before it stay complete and nothing of the bad pair is written."""
    bad = _image(tmp, "bad.nii.gz", np.full(SHAPE, np.nan, np.float32))
    case = refused(_pairs(tmp, a, f"{a['f']},{a['m']},,first\n{a['f']},{bad},,second\n"), "bad.nii.gz", "NaN")
    case.writes = ("out", "out/first", "out/first/")
    return case


# apply


def k_apply_points_empty(tmp, a):
    return refused(_points(tmp, a, ""), "pts.csv", "no points")


def k_apply_points_two_columns(tmp, a):
    return refused(_points(tmp, a, "1,2\n"), "pts.csv", "line 1")


def k_apply_points_nan(tmp, a):
    return refused(_points(tmp, a, "1,2,3\nnan,0,0\n"), "pts.csv", "line 2", "finite")


def k_apply_points_semicolons(tmp, a):
    return refused(_points(tmp, a, "1;2;3\n"), "pts.csv", "line 1")


def k_apply_points_binary(tmp, a):
    (tmp / "pts.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return refused(_apply(tmp, a, "--points", tmp / "pts.csv", out=tmp / "moved.csv"), "pts.csv", "UTF-8")


def k_apply_points_bom_crlf_and_header_accepted(tmp, a):
    """apply --points writes 'x,y,z' as its first line; a spreadsheet adds a BOM and CRLF: all read."""
    case = _points(tmp, a, "\ufeffx,y,z\r\n1,2,3\r\n\r\n4.5,5,6\r\n")
    return Case(case, (), status=0, stdout="mapped 2 points", writes=("moved.csv",))


def k_evaluate_pairs_bom_header_blank_lines(tmp, a):
    # the header names the columns (moving zz, fixed yy); the fixed column is checked first
    (tmp / "p.csv").write_bytes("\ufeffmoving,fixed\r\n\r\nzz,yy\r\n".encode())
    return refused(_evaluate(tmp, a, "--pairs", tmp / "p.csv"), "p.csv", "row 1", "unknown subject 'yy'")


def k_apply_image_and_points(tmp, a):
    (tmp / "pts.csv").write_text("1,2,3\n")
    return refused(_apply(tmp, a, "--image", a["m"], "--points", tmp / "pts.csv"), "exactly one of --image or --points")


def k_apply_out_is_its_own_image_even_with_overwrite(tmp, a):
    image = tmp / "img.nii.gz"
    image.write_bytes(Path(a["m"]).read_bytes())
    return refused(_apply(tmp, a, "--image", image, "--overwrite", out=image), "img.nii.gz", "is an input")


def k_apply_neither_image_nor_points(tmp, a):
    return refused(_apply(tmp, a), "exactly one of --image or --points")


def k_apply_disp_two_components(tmp, a):
    disp = _image(tmp, "d2.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    return refused(_apply(tmp, a, "--image", a["m"], disp=disp), "d2.nii.gz")


def k_apply_disp_nan(tmp, a):
    d = np.zeros((*SHAPE, 3), np.float32)
    d[3, 3, 3, 1] = np.nan
    return refused(_apply(tmp, a, "--image", a["m"], disp=_image(tmp, "dnan.nii.gz", d)), "dnan.nii.gz")


def k_apply_disp_other_grid_than_reference(tmp, a):
    disp = _image(tmp, "d24.nii.gz", np.zeros((24, 24, 24, 3), np.float32))
    return refused(_apply(tmp, a, "--image", a["m"], disp=disp), "d24.nii.gz")


def k_apply_disp_empty_file(tmp, a):
    (tmp / "d.nii.gz").write_bytes(b"")
    return refused(_apply(tmp, a, "--image", a["m"], disp=tmp / "d.nii.gz"), "d.nii.gz")


def k_apply_out_is_a_folder(tmp, a):
    (tmp / "w.nii.gz").mkdir()
    return refused(_apply(tmp, a, "--image", a["m"]), "w.nii.gz")


def k_apply_out_exists(tmp, a):
    (tmp / "w.nii.gz").write_bytes(b"the user's earlier result")
    return refused(_apply(tmp, a, "--image", a["m"]), "w.nii.gz", "--overwrite")


def k_apply_labels_linear(tmp, a):  # --labels alone means nearest (issue 28); linear is refused
    return refused(_apply(tmp, a, "--image", a["m"], "--labels", "--interpolation", "linear"), "nearest or onehot")


def k_apply_4d_image(tmp, a):
    return refused(_apply(tmp, a, "--image", _image(tmp, "4d.nii.gz", np.stack([_volume(1)] * 2, -1))), "4d.nii.gz")


def k_apply_learn2reg_format_of_a_nifti(tmp, a):
    return refused(_apply(tmp, a, "--image", a["m"], "--disp-format", "learn2reg"), "disp.nii.gz", "is a .npz file")


def k_apply_reference_without_orientation(tmp, a):
    img = nib.Nifti1Image(_volume(0), None)
    img.header["qform_code"], img.header["sform_code"] = 0, 0
    nib.save(img, str(tmp / "noorient.nii.gz"))
    return refused(_apply(tmp, a, "--image", a["m"], reference=tmp / "noorient.nii.gz"), "noorient.nii.gz")


# export


def k_export_disp_wrong_shape(tmp, a):
    disp = _image(tmp, "d.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    return refused(_export(tmp, a, "--out-dir", tmp / "x", disp=disp), "d.nii.gz", "expected a voxel displacement")


def k_export_disp_inf(tmp, a):
    d = np.zeros((*SHAPE, 3), np.float32)
    d[0, 0, 0, 0] = np.inf
    return refused(_export(tmp, a, "--out-dir", tmp / "x", disp=_image(tmp, "dinf.nii.gz", d)), "dinf.nii.gz", "NaN/Inf")


def k_export_out_dir_is_a_file(tmp, a):
    (tmp / "x").write_text("a file")
    return refused(_export(tmp, a, "--out-dir", tmp / "x"), "x")


def k_export_existing_output(tmp, a):
    (tmp / "x").mkdir()
    (tmp / "x" / "disp_itk.nii.gz").write_bytes(b"the user's earlier export")
    return refused(_export(tmp, a, "--out-dir", tmp / "x"), "disp_itk.nii.gz", "--overwrite")


def k_export_fixed_is_a_folder(tmp, a):
    (tmp / "fixed").mkdir()
    return refused(_export(tmp, a, "--out-dir", tmp / "x", fixed=tmp / "fixed"), "fixed", "is a folder")


def k_export_pair_ids_empty(tmp, a):
    return refused(_export(tmp, a, "--pair-ids", "", "2", "--out-dir", tmp / "x", fmt="learn2reg"), "--pair-ids")


# figure


def k_figure_jpg(tmp, a):
    return refused(_figure(tmp, a, out=tmp / "fig.jpg"), "fig.jpg", ".png or .pdf")


def k_figure_out_is_a_folder(tmp, a):
    (tmp / "fig.png").mkdir()
    return refused(_figure(tmp, a), "fig.png")


def k_figure_out_exists(tmp, a):
    (tmp / "fig.png").write_bytes(b"\x89PNG the user's figure")
    return refused(_figure(tmp, a), "fig.png", "--overwrite")


def k_figure_negative_io_steps(tmp, a):
    return refused(_figure(tmp, a, "--io-steps", "-1"), "--io-steps")


def k_figure_fixed_seg_other_shape(tmp, a):
    seg = _image(tmp, "fseg.nii.gz", np.ones((32, 32, 31), np.int16))
    return refused(_figure(tmp, a, "--fixed-seg", seg), "fseg.nii.gz")


def k_figure_empty_moving(tmp, a):
    (tmp / "m0.nii.gz").write_bytes(b"")
    argv = _figure(tmp, a)
    argv[argv.index("--moving") + 1] = tmp / "m0.nii.gz"
    return refused(argv, "m0.nii.gz")


# evaluate


def k_evaluate_config_missing(tmp, a):
    return refused(_evaluate(tmp, a, config=tmp / "none.py"), "none.py", "no such config file")


def k_evaluate_config_syntax_error(tmp, a):
    (tmp / "cfg.py").write_text("def get_config(:\n")
    return refused(_evaluate(tmp, a, config=tmp / "cfg.py"), "cfg.py", "does not load")


def k_evaluate_config_without_get_config(tmp, a):
    (tmp / "cfg.py").write_text("x = 1\n")
    return refused(_evaluate(tmp, a, config=tmp / "cfg.py"), "cfg.py")


def k_evaluate_config_is_a_folder(tmp, a):
    (tmp / "cfg.py").mkdir()
    return refused(_evaluate(tmp, a, config=tmp / "cfg.py"), "cfg.py")


def k_evaluate_unknown_split(tmp, a):
    return refused(_evaluate(tmp, a, "--split", "holdout"), "'holdout'")


def k_evaluate_pairs_unknown_subject(tmp, a):
    (tmp / "p.csv").write_text("fixed,moving\nsubject_x,subject_y\n")
    return refused(_evaluate(tmp, a, "--pairs", tmp / "p.csv"), "p.csv", "unknown subject")


def k_evaluate_pairs_one_column(tmp, a):
    (tmp / "p.csv").write_text("fixed,moving\n0\n")
    return refused(_evaluate(tmp, a, "--pairs", tmp / "p.csv"), "p.csv", "row 1")


def k_evaluate_out_dir_is_a_file(tmp, a):
    (tmp / "e").write_text("a file")
    return refused(_evaluate(tmp, a, "--max-pairs", "1", "--no-hd95", "--timing-repeats", "1"), "e")


def k_evaluate_data_root_missing(tmp, a):
    return refused(_evaluate(tmp, a, "--data-root", tmp / "nodata", config=ROOT / "configs" / "lpba40_vm.py"), "nodata")


# convert-official


def k_convert_empty_checkpoint(tmp, a):
    (tmp / "ck.pth").write_bytes(b"")
    return refused(_convert(tmp, tmp / "ck.pth"), "ck.pth")


def k_convert_text_checkpoint(tmp, a):
    (tmp / "ck.pth").write_text("not a checkpoint\n")
    return refused(_convert(tmp, tmp / "ck.pth"), "ck.pth")


def k_convert_zip_without_data(tmp, a):
    with zipfile.ZipFile(tmp / "ck.pth", "w") as z:
        z.writestr("archive/version", "3\n")
    return refused(_convert(tmp, tmp / "ck.pth"), "ck.pth")


def k_convert_pickle_that_runs_code(tmp, a):
    marker = tmp / "owned"
    (tmp / "ck.pth").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    return refused(_convert(tmp, tmp / "ck.pth"), "ck.pth")


def k_convert_checkpoint_is_a_folder(tmp, a):
    (tmp / "ck.pth").mkdir()
    return refused(_convert(tmp, tmp / "ck.pth"), "ck.pth", "is a folder")


def k_convert_out_is_a_file(tmp, a):
    from test_cli import _random_official_state, _write_legacy

    _write_legacy(tmp / "ck.pth", _random_official_state(False))
    (tmp / "conv").write_text("a file")
    return refused(_convert(tmp, tmp / "ck.pth"), "conv")


def k_convert_teacher_checkpoint_as_student(tmp, a):
    from test_cli import _random_official_state, _write_legacy

    _write_legacy(tmp / "ck.pth", _random_official_state(False))
    return refused(_convert(tmp, tmp / "ck.pth", kind="teacher"), "ck.pth")


# finetune


def k_finetune_one_image(tmp, a):
    _scans(tmp, 1)
    return refused(_finetune(tmp, a), "scans")


def k_finetune_empty_folder(tmp, a):
    (tmp / "scans").mkdir()
    return refused(_finetune(tmp, a), "scans")


def k_finetune_images_not_nifti(tmp, a):
    (tmp / "scans").mkdir()
    for i in range(3):
        (tmp / "scans" / f"s{i}.txt").write_text("notes")
    return refused(_finetune(tmp, a), "scans")


def k_finetune_images_is_a_file(tmp, a):
    (tmp / "scans").write_text("x")
    return refused(_finetune(tmp, a), "scans", "not a folder")


def k_finetune_mismatched_label_shapes(tmp, a):
    _scans(tmp, 4, labels=[SHAPE, SHAPE, (32, 32, 30), SHAPE])
    return refused(_finetune(tmp, a, "--labels", tmp / "labels", "--val-subjects", "1"), "s2.nii.gz")


def k_finetune_labels_folder_missing(tmp, a):
    _scans(tmp, 3)
    return refused(_finetune(tmp, a, "--labels", tmp / "nolabels"), "nolabels", "not a folder of label maps")


def k_finetune_one_empty_scan(tmp, a):
    _scans(tmp, 3)
    (tmp / "scans" / "s1.nii.gz").write_bytes(b"")
    return refused(_finetune(tmp, a), "s1.nii.gz")


def k_finetune_zero_steps(tmp, a):
    _scans(tmp, 3)
    argv = _finetune(tmp, a)
    argv[argv.index("--steps") + 1] = "0"
    return refused(argv, "--steps", "at least 1")


def k_finetune_nan_lr(tmp, a):
    _scans(tmp, 3)
    return refused(_finetune(tmp, a, "--lr", "nan"), "--lr", "finite")


def k_finetune_negative_val_subjects(tmp, a):
    _scans(tmp, 3, labels=[SHAPE] * 3)
    return refused(_finetune(tmp, a, "--labels", tmp / "labels", "--val-subjects", "-1"), "--val-subjects", "0 or more")


def k_finetune_out_exists(tmp, a):
    _scans(tmp, 3)
    (tmp / "tuned").mkdir()
    (tmp / "tuned" / "notes.md").write_text("keep")
    return refused(_finetune(tmp, a), "tuned", "not a crd-jax model folder")


def k_finetune_over_a_model_folder_needs_overwrite(tmp, a):
    _scans(tmp, 3)
    shutil.copytree(a["geo"], tmp / "tuned")
    return refused(_finetune(tmp, a), "tuned", "--overwrite")


def k_finetune_model_without_geometry_names_the_option(tmp, a):
    _scans(tmp, 3)
    argv = _finetune(tmp, a)
    argv[argv.index("--model") + 1] = a["model"]
    return refused(argv, "--model: the model records no training orientation")


def k_finetune_2d_model_3d_scans(tmp, a):
    _scans(tmp, 3)
    argv = _finetune(tmp, a)
    argv[argv.index("--model") + 1] = a["model2d"]
    return refused(argv, "scans")


# train.py


def k_train_unknown_field(tmp, a):
    return train_refused(["--config.train.learning_rate=0.1"], "learning_rate")


def k_train_wrong_type(tmp, a):
    return train_refused(["--config.train.lr=fast"], "config.train.lr")


def k_train_int_field_given_float(tmp, a):
    return train_refused(["--config.train.batch_size=2.5"], "batch_size")


def k_train_zero_batch(tmp, a):
    return train_refused(["--config.train.batch_size=0"], "config.train.batch_size")


def k_train_negative_steps(tmp, a):
    return train_refused(["--config.stages.vm_l.steps=-10"], "steps")


def k_train_config_missing(tmp, a):
    return train_refused([f"--config={tmp / 'none.py'}"], "none.py")


def k_train_config_raises(tmp, a):
    (tmp / "cfg.py").write_text("def get_config():\n    raise RuntimeError('broken on purpose')\n")
    return train_refused([f"--config={tmp / 'cfg.py'}"], "broken on purpose")


def k_train_unknown_flag(tmp, a):
    return train_refused(["--bogus"], "bogus")


def k_train_positional_argument(tmp, a):
    return train_refused(["extra"], "unexpected arguments: extra")


def k_train_workdir_is_a_file(tmp, a):
    (tmp / "wdfile").write_text("x")
    return train_refused([f"--config.workdir={tmp / 'wdfile'}"], "wdfile")


def k_train_data_root_missing(tmp, a):
    return train_refused([f"--config={ROOT / 'configs' / 'lpba40_vm.py'}", f"--config.data.root={tmp / 'nodata'}"], "nodata")


def k_train_unknown_pipeline_stage(tmp, a):
    return train_refused(["--config.pipeline=('vm_l','nonsense')"], "nonsense")


def k_train_nan_weight(tmp, a):
    return train_refused(["--config.train.b1=nan"], "config.train.b1")


def k_train_4d_synthetic_shape(tmp, a):
    return train_refused(["--config.data.synthetic.shape=(32,32,32,32)"], "config.data.synthetic.shape")


KINDS = {k[2:]: v for k, v in sorted(globals().items()) if k.startswith("k_")}
# refused before a model is loaded or a program compiled (about 1 s each): the quick tier
QUICK = {n for n in KINDS if n.startswith(("cli_", "pairs_", "apply_points", "export_", "convert_"))} - {
    "pairs_second_pair_bad_first_pair_complete",
    "convert_out_is_a_file",
    "convert_teacher_checkpoint_as_student",
}


def _run(case, tmp):
    if case.tool == "train":
        args = (
            case.argv
            if any(a.startswith("--config.workdir=") for a in case.argv)
            else [*case.argv, f"--config.workdir={tmp / 'wd'}"]
        )
        import subprocess

        from test_adversarial import ENV

        return subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=tmp,
            env=ENV,
            timeout=120,
        )
    return crd(case.argv, cwd=tmp, env=case.env, timeout=120)


def _check(tmp, more, name):
    case = KINDS[name](tmp, more)
    before = snapshot(tmp)
    proc = _run(case, tmp)
    print(f"{name}: exit {proc.returncode}: {proc.stderr.strip()}")  # the line, for -rP
    if case.status == 0:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert case.stdout in proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == len(case.needles) <= 1, proc.stderr[-3000:]
        assert all(n in lines[0] for n in case.needles) and "Traceback" not in proc.stderr
    else:
        assert_one_line(proc, case.status, *case.needles)
    after = snapshot(tmp)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the user's changed
    new = sorted(set(after) - set(before))  # nothing else left behind; "x/" allows anything under x
    assert [p for p in new if p not in case.writes and not any(w.endswith("/") and p.startswith(w) for w in case.writes)] == []
    assert all(w in new or w.endswith("/") for w in case.writes), (new, case.writes)
    if "out/first/" in case.writes:
        assert {"out/first/disp.nii.gz", "out/first/warped.nii.gz"} <= set(new)
    assert not (tmp / "owned").exists()


@pytest.mark.parametrize("name", sorted(QUICK))
@pytest.mark.slow
def test_refused_before_any_model_is_loaded(tmp_path, more, name):
    _check(tmp_path, more, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(KINDS) - QUICK))
def test_refused_with_one_line(tmp_path, more, name):
    _check(tmp_path, more, name)


def test_the_suite_has_at_least_100_kinds():
    import test_adversarial

    assert len(KINDS) + len(test_adversarial.KINDS) + len(test_adversarial.TRAIN_KINDS) >= 100


def test_the_shared_assets_were_never_changed(more):
    assert snapshot(more["root"]) == more["before"]
    assert snapshot(more["more_root"]) == more["more_before"]
