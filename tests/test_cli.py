"""The crd-jax command, displacement formats, the official-weights converter and parity with the authors."""

import collections
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax.cli.main import main
from crd_jax.data.io import Volume
from crd_jax.errors import InputError
from crd_jax.interop import formats, official
from crd_jax.interop.torch_legacy import MAGIC_NUMBER, load_legacy_checkpoint
from crd_jax.models.build import model_from_spec
from crd_jax.ops.spatial import warp
from crd_jax.model_io import save_model

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official_crd"
# An oblique, anisotropic, axis-flipped geometry so that any mix-up of axes, signs or spacing shows.
_C, _S = np.cos(0.2), np.sin(0.2)
AFFINE = np.eye(4)
AFFINE[:3, :3] = np.array([[-_C, _S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.1, 0.9, 1.4])
AFFINE[:3, 3] = [80.0, -100.0, -60.0]


def _smooth_volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return ((v - v.min()) / np.ptp(v)).astype(np.float32)


def _smooth_field(shape, amplitude, seed=1, sigma=4.0):
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.normal(size=(*shape, 3)), (sigma, sigma, sigma, 0))
    return (f / np.abs(f).max() * amplitude).astype(np.float32)


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


# --- formats ---------------------------------------------------------------------------------------------


def test_itk_field_applied_by_simpleitk_moves_the_image_like_our_warp(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    shape = (30, 26, 22)
    moving = _smooth_volume(shape)
    disp = _smooth_field(shape, 3.0)
    fixed = Volume(np.zeros(shape, np.float32), AFFINE)
    _save(tmp_path / "moving.nii.gz", moving)
    _save(tmp_path / "fixed.nii.gz", fixed.data)
    path = next(p for p in formats.write_displacement(tmp_path, disp, fixed, "itk") if p.name.endswith(".nii.gz"))
    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == shape
    transform = sitk.DisplacementFieldTransform(field)
    itk_warped = sitk.Resample(
        sitk.ReadImage(str(tmp_path / "moving.nii.gz")),
        sitk.ReadImage(str(tmp_path / "fixed.nii.gz")),
        transform,
        sitk.sitkLinear,
        0.0,
    )
    itk_warped = np.transpose(sitk.GetArrayFromImage(itk_warped), (2, 1, 0))  # SimpleITK arrays are z, y, x
    ours = np.asarray(warp(jnp.asarray(moving)[None, ..., None], jnp.asarray(disp)[None]))[0, ..., 0]
    inside = (slice(4, -4),) * 3  # ITK reads zeros beyond the edge, we repeat the edge voxel
    np.testing.assert_allclose(itk_warped[inside], ours[inside], atol=2e-4)
    np.testing.assert_allclose(formats.from_itk(nib.load(path).get_fdata(), AFFINE), disp, atol=1e-4)


def test_itk_field_with_the_affine_maths_done_by_hand(tmp_path):
    """The same check without ITK: physical points, LPS vectors and the moving image's own affine."""
    shape = (20, 18, 16)
    moving_affine = AFFINE @ np.diag([1.0, 1.0, 1.0, 1.0])
    moving = _smooth_volume(shape, 3)
    disp = _smooth_field(shape, 2.0, seed=4)
    fixed = Volume(np.zeros(shape, np.float32), AFFINE)
    path = next(p for p in formats.write_displacement(tmp_path, disp, fixed, "itk") if p.name.endswith(".nii.gz"))
    img = nib.load(path)
    assert img.shape == (*shape, 1, 3) and img.header.get_intent()[0] == "vector"
    lps = img.get_fdata()[:, :, :, 0, :]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    world_ras = grid @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    target_ras = world_ras + lps * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    inv = np.linalg.inv(moving_affine)
    coords = target_ras @ inv[:3, :3].T + inv[:3, 3]
    by_hand = ndimage.map_coordinates(moving, np.moveaxis(coords, -1, 0), order=1, mode="nearest")
    ours = np.asarray(warp(jnp.asarray(moving)[None, ..., None], jnp.asarray(disp)[None]))[0, ..., 0]
    np.testing.assert_allclose(by_hand, ours, atol=1e-4)


def test_learn2reg_export_round_trip(tmp_path):
    shape = (32, 24, 28)
    disp = _smooth_field(shape, 4.0, sigma=8.0)  # the half-resolution format keeps smooth fields
    fixed = Volume(np.zeros(shape, np.float32), AFFINE)
    paths = formats.write_displacement(tmp_path, disp, fixed, "learn2reg", pair_ids=("0438", "0439"))
    assert [p.name for p in paths] == ["disp_0438_0439.npz", "disp_0438_0439.nii.gz"]
    half = np.load(paths[0])["arr_0"]
    assert half.dtype == np.float16 and half.shape == (3, 16, 12, 14)
    back = formats.from_learn2reg(half, shape)
    np.testing.assert_allclose(back[4:-4, 4:-4, 4:-4], disp[4:-4, 4:-4, 4:-4], atol=0.05)
    np.testing.assert_allclose(nib.load(paths[1]).get_fdata(), disp, atol=1e-6)


# --- register ----------------------------------------------------------------------------------------------


def test_register_odd_sized_volume_keeps_shape_and_affine(tmp_path, shift_model, capsys):
    shape = (37, 45, 29)
    fixed = _save(tmp_path / "f.nii.gz", _smooth_volume(shape, 0))
    moving = _save(tmp_path / "m.nii.gz", _smooth_volume(shape, 1) * 300)
    seg = _save(tmp_path / "s.nii.gz", (np.arange(np.prod(shape)).reshape(shape) % 5).astype(np.uint8))
    out = tmp_path / "out"
    assert (
        main(
            [
                "register",
                "--model",
                str(shift_model),
                "--fixed",
                fixed,
                "--moving",
                moving,
                "--moving-seg",
                seg,
                "--out-dir",
                str(out),
                "--no-affine",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "padded (37, 45, 29) -> (64, 64, 32)" in text
    warped, disp, wseg = (nib.load(out / n) for n in ("warped.nii.gz", "disp.nii.gz", "warped_seg.nii.gz"))
    assert warped.shape == shape and disp.shape == (*shape, 3) and wseg.shape == shape
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-6)
    d = disp.get_fdata()
    np.testing.assert_allclose(d[5:-5, 5:-5, 5:-5], np.broadcast_to([1.5, -0.5, 0.25], d[5:-5, 5:-5, 5:-5].shape), atol=1e-3)
    ref = ndimage.map_coordinates(
        _smooth_volume(shape, 1) * 300,
        np.moveaxis(np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) + d, -1, 0),
        order=1,
        mode="nearest",
    )
    np.testing.assert_allclose(warped.get_fdata(), ref, atol=1e-2)  # original intensities, not normalised
    assert set(np.unique(wseg.get_fdata())) <= set(range(5))
    assert sorted(p.name for p in out.iterdir()) == ["disp.nii.gz", "registration.json", "warped.nii.gz", "warped_seg.nii.gz"]


def test_register_resamples_a_moving_image_on_another_grid(tmp_path, shift_model, capsys):
    shape = (32, 32, 32)
    fixed = _save(tmp_path / "f.nii.gz", _smooth_volume(shape, 0))
    coarse = AFFINE.copy()
    coarse[:3, :3] *= 2
    moving = _save(tmp_path / "m.nii.gz", _smooth_volume((16, 16, 16), 1), coarse)
    assert (
        main(
            [
                "register",
                "--model",
                str(shift_model),
                "--fixed",
                fixed,
                "--moving",
                moving,
                "--out-dir",
                str(tmp_path / "o"),
                "--disp-format",
                "learn2reg",
            ]
        )
        == 0
    )
    assert "resampled onto the fixed grid" in capsys.readouterr().out
    assert nib.load(tmp_path / "o" / "warped.nii.gz").shape == shape
    assert (tmp_path / "o" / "disp_0000_0001.npz").exists()


BAD_CASES = {
    "truncated": lambda p: (
        p.write_bytes(Path(_save(p.with_name("ok.nii.gz"), _smooth_volume((20, 20, 20)))).read_bytes()[:300]),
        p,
    )[1],
    "two_d": lambda p: Path(_save(p, _smooth_volume((20, 20)))),
    "four_d": lambda p: Path(_save(p, np.zeros((10, 10, 10, 2), np.float32))),
    "nan": lambda p: Path(_save(p, np.full((10, 10, 10), np.nan, np.float32))),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_register_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, shift_model, capsys, case):
    good = _save(tmp_path / "good.nii.gz", _smooth_volume((32, 32, 32)))
    bad = BAD_CASES[case](tmp_path / "bad.nii.gz")
    out = tmp_path / "out"
    assert main(["register", "--model", str(shift_model), "--fixed", good, "--moving", str(bad), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"crd-jax: error: {bad}") and "\n" not in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_register_rejects_wrong_models_and_an_output_file(tmp_path, shift_model, capsys):
    img = _save(tmp_path / "i.nii.gz", _smooth_volume((32, 32, 32)))
    (tmp_path / "empty").mkdir()
    outfile = tmp_path / "out.txt"
    outfile.write_text("x")
    mismatched = tmp_path / "mismatch"
    arch = official.ARCHITECTURE | {"encoder": [8, 16, 16, 16, 16]}
    save_model(mismatched, {"unet": {}}, {"kind": "registrar", "factor": 2, "architecture": arch})
    cases = [
        (["--model", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o")], "not a crd-jax model folder"),
        (["--model", img, "--out-dir", str(tmp_path / "o")], "no such model folder"),
        (["--model", str(mismatched), "--out-dir", str(tmp_path / "o")], "do not match the model's architecture"),
        (["--model", str(shift_model), "--out-dir", str(outfile)], "output folder is a file"),
    ]
    for extra, message in cases:
        assert main(["register", "--fixed", img, "--moving", img, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert outfile.read_text() == "x"


def test_python_m_crd_jax_is_the_same_command(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "crd_jax", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_text.returncode == 0 and "register" in help_text.stdout and "convert-official" in help_text.stdout
    for sub in ("register", "evaluate", "figure", "convert-official", "export"):
        assert subprocess.run([sys.executable, "-m", "crd_jax", sub, "--help"], capture_output=True, cwd=ROOT).returncode == 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "crd_jax",
            "register",
            "--model",
            str(tmp_path),
            "--fixed",
            "a.nii.gz",
            "--moving",
            "b.nii.gz",
            "--out-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_evaluate_and_figure_on_synthetic_data(tmp_path, shift_model, capsys):
    config = tmp_path / "tiny.py"
    config.write_text(
        "from crd_jax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.data.synthetic.shape = (32, 32, 32)\n"
        "    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 2, 0, 3\n"
        "    return c\n"
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(shift_model),
                "--config",
                str(config),
                "--out-dir",
                str(out),
                "--max-pairs",
                "2",
                "--timing-repeats",
                "1",
            ]
        )
        == 0
    )
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("moving,fixed,dice,dice_1,") and len(lines) == 3
    summary = (out / "summary.md").read_text()
    assert "| dice |" in summary and "| hd95 |" in summary and "Inference:" in summary
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed\nsynth0004,synth0002\n")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(shift_model),
                "--config",
                str(config),
                "--out-dir",
                str(out),
                "--pairs",
                str(pairs),
                "--no-hd95",
                "--timing-repeats",
                "1",
                "--overwrite",
            ]
        )
        == 0
    )
    assert (out / "metrics.csv").read_text().splitlines()[1].startswith("synth0004,synth0002,")
    pairs.write_text("fixed,moving\nsynth0002,synth0009\n")
    assert main(["evaluate", "--model", str(shift_model), "--config", str(config), "--pairs", str(pairs)]) == 2
    assert "unknown subject 'synth0009'" in capsys.readouterr().err
    pairs.write_text("synth0002,synth0004\n")  # no header: refused, since 0.1.0 read such rows the other way round
    assert main(["evaluate", "--model", str(shift_model), "--config", str(config), "--pairs", str(pairs)]) == 2
    assert "needs a header row naming its columns" in capsys.readouterr().err
    f = _save(tmp_path / "f.nii.gz", _smooth_volume((32, 32, 32), 0))
    m = _save(tmp_path / "m.nii.gz", _smooth_volume((32, 32, 32), 1))
    seg = _save(tmp_path / "s.nii.gz", (_smooth_volume((32, 32, 32), 2) * 4).astype(np.uint8))
    png = tmp_path / "pair.png"
    assert (
        main(
            [
                "figure",
                "--model",
                str(shift_model),
                "--fixed",
                f,
                "--moving",
                m,
                "--fixed-seg",
                seg,
                "--moving-seg",
                seg,
                "--out",
                str(png),
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


# --- the authors' checkpoints ------------------------------------------------------------------------------


def _write_legacy(path, state, geometry=None, missing=()):
    """A legacy (pre-1.6) torch checkpoint written without torch, as torch.save would lay it out; ``geometry``
    ``{name: (offset, size, stride)}`` and ``missing`` (names whose storage is left out) craft damaged ones."""
    geometry = geometry or {}

    class FloatStorage:
        _torch_name = ("torch", "FloatStorage")

    def rebuild(*args):
        raise AssertionError("never called")

    rebuild._torch_name = ("torch._utils", "_rebuild_tensor_v2")

    class Tensor:
        def __init__(self, key, array, name):
            self.key, self.array, self.name = key, array, name

        def __reduce__(self):
            stride = tuple(s // 4 for s in self.array.strides)
            offset, size, stride = geometry.get(self.name, (0, self.array.shape, stride))
            return rebuild, (self, offset, size, stride, False, collections.OrderedDict())

    class Writer(pickle._Pickler):
        def save_global(self, obj, name=None):
            target = getattr(obj, "_torch_name", None)
            if target is None:
                return super().save_global(obj, name)
            self.write(pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode())
            self.memoize(obj)

        dispatch = dict(pickle._Pickler.dispatch)
        dispatch[type(rebuild)] = save_global

        def persistent_id(self, obj):
            if isinstance(obj, Tensor) and getattr(self, "_in_tensor", None) is obj:
                return ("storage", FloatStorage, obj.key, "cpu", obj.array.size, None)
            return None

        def save_reduce(self, func, args, *rest, obj=None, **kw):
            if isinstance(obj, Tensor):
                self._in_tensor = obj  # the first argument (the tensor itself) becomes its storage reference
            return super().save_reduce(func, args, *rest, obj=obj, **kw)

    tensors = collections.OrderedDict(
        (k, Tensor(str(i), np.ascontiguousarray(v, np.float32), k)) for i, (k, v) in enumerate(state.items())
    )
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Writer(f, protocol=2).dump(tensors)
        keys = sorted(t.key for k, t in tensors.items() if k not in missing)
        pickle.dump(keys, f, protocol=2)
        by_key = {t.key: t.array for t in tensors.values()}
        for key in keys:
            f.write(struct.pack("<q", by_key[key].size))
            f.write(by_key[key].astype("<f4").tobytes())


def _random_official_state(teacher: bool, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1": (16, 2),
        "conv2": (32, 16),
        "conv3": (32, 32),
        "conv4": (32, 32),
        "conv5": (32, 32),
        "decode5": (32, 32),
        "decode4": (32, 64),
        "decode3": (32, 64),
        "decode2": (32, 64),
        "decode2_1": (16, 32),
        "decode1": (16, 32),
        "flow": (3, 16),
    }
    if teacher:
        shapes.update(
            {"fuse5": (32, 64), "fuse4": (32, 96), "fuse3": (32, 80), "fuse2": (32, 64), "fuse1": (16, 48), "flow_f": (3, 16)}
        )
    state = collections.OrderedDict()
    for name, (o, i) in shapes.items():
        state[f"module.defnet_0.{name}.weight"] = rng.normal(0, 0.1, (o, i, 3, 3, 3)).astype(np.float32)
        state[f"module.defnet_0.{name}.bias"] = rng.normal(0, 0.1, (o,)).astype(np.float32)
    return state


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_converter_round_trip_on_a_legacy_file_written_by_the_test(tmp_path, kind, capsys):
    state = _random_official_state(kind == "teacher")
    path = tmp_path / f"{kind}.pth"
    _write_legacy(path, state)
    loaded = load_legacy_checkpoint(path)
    assert list(loaded) == list(state)
    for k in state:
        np.testing.assert_array_equal(loaded[k], state[k])
    out = tmp_path / "model"
    assert main(["convert-official", "--checkpoint", str(path), "--kind", kind, "--out", str(out)]) == 0
    from crd_jax.registration.model import load

    model = load(out)
    backbone = model.params["backbone"] if kind == "teacher" else model.params
    # weight (out, in, kD, kH, kW) over (D, H, W) -> (kX, kY, kZ, in, out); conv1's input pair swapped
    w = state["module.defnet_0.decode4.weight"]
    np.testing.assert_array_equal(backbone["unet"]["dec_3_0"]["kernel"], np.transpose(w, (4, 3, 2, 1, 0)))
    w1 = state["module.defnet_0.conv1.weight"]
    np.testing.assert_array_equal(backbone["unet"]["enc_0"]["kernel"][..., 0, :], np.transpose(w1[:, 1], (3, 2, 1, 0)))
    wrong = "teacher" if kind == "student" else "student"
    assert main(["convert-official", "--checkpoint", str(path), "--kind", wrong, "--out", str(tmp_path / "x")]) == 2
    assert f"use --kind {kind}" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated"):
        load_legacy_checkpoint(path)


@pytest.mark.parametrize(
    "geometry, missing, needle",
    [
        ({"w": (0, (1000, 1000), (10**9, 1))}, (), "reads element"),  # far outside its storage: crashed the process
        ({"w": (0, (3, 3), (2, 1))}, (), "reads element"),  # just past the end: read the heap into the weights
        ({"w": (5, (2,), (1,))}, (), "reads element"),
        ({"w": (0, (-5,), (1,))}, (), "negative"),
        ({"w": (0, (2, 2), (-2, 1))}, (), "negative"),
        ({"w": (-1, (2,), (1,))}, (), "negative"),
        ({"w": (0, (2**20, 2**20), (0, 0))}, (), "elements"),
        ({"w": (0, (2, 2), (2,))}, (), "malformed"),
        ({}, ("w",), "does not hold"),
    ],
)
def test_a_crafted_tensor_geometry_is_refused_before_any_memory_is_read(tmp_path, geometry, missing, needle):
    """Offsets, sizes and strides come from the file and ``as_strided`` trusts them: each tensor is checked
    against its storage (4 elements here) first."""
    path = tmp_path / "crafted.pth"
    _write_legacy(path, collections.OrderedDict(w=np.arange(4, dtype=np.float32).reshape(2, 2)), geometry, missing)
    with pytest.raises(InputError, match=needle):
        load_legacy_checkpoint(path)


def test_a_crafted_checkpoint_gets_one_line_from_convert_official(tmp_path):
    """The file that crashed the command (a segmentation fault reading far outside a 4-element storage), in a
    fresh process: one line, exit 2, no model folder."""
    path = tmp_path / "oob.pth"
    _write_legacy(path, collections.OrderedDict(w=np.zeros((2, 2), np.float32)), {"w": (0, (1000, 1000), (10**9, 1))})
    cmd = [sys.executable, "-m", "crd_jax", "convert-official", "--checkpoint", str(path), "--kind", "student"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "reads element" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oob.pth"]


def _official_available():
    return (OFFICIAL / "reference_io.npz").exists() and (OFFICIAL / "student_oasis.pth").exists()


@pytest.mark.skipif(not _official_available(), reason="the authors' checkpoints are not in ../shared/official_crd")
@pytest.mark.slow
def test_parity_with_the_authors_code_on_reference_io(tmp_path):
    ref = np.load(OFFICIAL / "reference_io.npz")
    nifti = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # their (D, H, W) -> NIfTI (X, Y, Z)
    field = lambda f: np.stack([nifti(f[c]) for c in range(3)], -1)  # their channels (x, y, z) are ours
    m = jnp.asarray(nifti(ref["moving"]))[None, ..., None]
    f = jnp.asarray(nifti(ref["fixed"]))[None, ..., None]
    for kind in ("student", "teacher"):
        params, spec = official.convert(load_legacy_checkpoint(OFFICIAL / f"{kind}_oasis.pth"), kind)
        out = jax.jit(model_from_spec(spec).apply)(params, m, f)
        assert np.abs(np.asarray(out["disp"][0]) - field(ref[f"{kind}_flow"])).max() <= 1e-3
        for level, name in enumerate(("1x", "2x", "4x", "8x")):  # the attention maps the authors distil
            attention = np.asarray(jnp.sum(out["features"][level][0] ** 2, -1))
            np.testing.assert_allclose(attention, nifti(ref[f"{kind}_attn_{name}_s"]), rtol=1e-4, atol=1e-4)
    # The command line, on NIfTI files stored as the authors' data is (OASIS aligned_norm's affine, LIA: the
    # converted model's recorded orientation, so nothing is reoriented), gives their displacement and warped image.
    aff = np.array([[-1.0, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])
    fixed, moving = (
        _save(tmp_path / "f.nii.gz", nifti(ref["fixed"]), aff),
        _save(tmp_path / "m.nii.gz", nifti(ref["moving"]), aff),
    )
    assert (
        main(
            [
                "convert-official",
                "--checkpoint",
                str(OFFICIAL / "student_oasis.pth"),
                "--kind",
                "student",
                "--out",
                str(tmp_path / "student"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "register",
                "--model",
                str(tmp_path / "student"),
                "--fixed",
                fixed,
                "--moving",
                moving,
                "--out-dir",
                str(tmp_path / "out"),
                "--no-affine",
            ]
        )
        == 0
    )  # the network alone, as the authors' code runs it
    disp = nib.load(tmp_path / "out" / "disp.nii.gz").get_fdata()
    assert np.abs(disp - field(ref["student_flow"])).max() <= 1e-3
    warped = nib.load(tmp_path / "out" / "warped.nii.gz").get_fdata()
    assert np.abs(warped - nifti(ref["student_warped_moving"])).max() <= 1e-3


def test_every_subcommand_help_has_a_description_and_an_example(capsys):
    from crd_jax.cli.main import parser

    sub = next(a for a in parser()._actions if getattr(a, "choices", None) and "register" in a.choices).choices
    for name, p in sub.items():
        text = p.format_help()
        assert p.description and "example:" in text and "crd-jax " + name in text.split("example:", 1)[1], name
    with pytest.raises(SystemExit):
        main(["--version"])
    from crd_jax.ops import native

    out = capsys.readouterr().out
    assert "convolution:" in out and f"--bf16: {native.describe_bf16() or 'unavailable on this CPU'}" in out


def test_every_option_has_help_and_every_example_parses():
    """Each option of each subcommand says what it does; each subcommand's example is a command line its
    parser accepts as written (the README's walkthrough runs the main ones)."""
    import shlex

    from crd_jax.cli.main import parser

    sub = next(a for a in parser()._actions if getattr(a, "choices", None) and "register" in a.choices).choices
    for name, p in sub.items():
        for action in p._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
        text = p.epilog.split("example:", 1)[1].replace("example:", "\n").replace("\\\n", " ")
        examples = [shlex.split(line) for line in text.splitlines() if line.strip().startswith("crd-jax")]
        assert any(argv[1] == name for argv in examples), (name, p.epilog)
        for argv in examples:  # exits with status 2 if an example does not parse
            parser().parse_args(argv[1:])


def test_register_help_names_the_default_model_and_the_presets():
    from crd_jax import pretrained
    from crd_jax.cli.main import parser

    sub = next(a for a in parser()._actions if getattr(a, "choices", None) and "register" in a.choices).choices
    text = " ".join(sub["register"].format_help().split())
    assert f"default: {pretrained.default_model()}" in text and "best shipped" not in text
    assert "--quality {fast,accurate}" in text and "--no-affine" in text


def test_register_pairs_csv_writes_one_folder_per_pair_like_single_registrations(tmp_path, shift_model, capsys):
    shape = (33, 40, 30)
    for i in range(2):
        _save(tmp_path / f"f{i}.nii.gz", _smooth_volume(shape, 2 * i))
        _save(tmp_path / f"m{i}.nii.gz", _smooth_volume(shape, 2 * i + 1))
    _save(tmp_path / "s0.nii.gz", (np.arange(np.prod(shape)).reshape(shape) % 4).astype(np.uint8))
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,moving_seg,name\nf0.nii.gz,m0.nii.gz,s0.nii.gz\nf1.nii.gz,m1.nii.gz,,second\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "register",
                "--model",
                str(shift_model),
                "--pairs",
                str(tmp_path / "pairs.csv"),
                "--out-dir",
                str(out),
                "--no-affine",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "registered 2 pairs" in text and "pairs/s" in text
    assert sorted(p.name for p in (out / "m0_to_f0").iterdir()) == [
        "disp.nii.gz",
        "registration.json",
        "warped.nii.gz",
        "warped_seg.nii.gz",
    ]
    assert sorted(p.name for p in (out / "second").iterdir()) == ["disp.nii.gz", "registration.json", "warped.nii.gz"]
    single = tmp_path / "single"
    assert (
        main(
            [
                "register",
                "--model",
                str(shift_model),
                "--fixed",
                str(tmp_path / "f1.nii.gz"),
                "--moving",
                str(tmp_path / "m1.nii.gz"),
                "--out-dir",
                str(single),
                "--no-affine",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        nib.load(out / "second" / "disp.nii.gz").get_fdata(), nib.load(single / "disp.nii.gz").get_fdata()
    )
    # the Python API gives the same field
    from crd_jax.api import register_files

    [(pair, result)] = list(register_files([(tmp_path / "f1.nii.gz", tmp_path / "m1.nii.gz")], model=str(shift_model)))
    np.testing.assert_allclose(result["disp"], nib.load(single / "disp.nii.gz").get_fdata(), atol=1e-6)
    # a second run refuses before computing anything; nothing changes
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["register", "--model", str(shift_model), "--pairs", str(tmp_path / "pairs.csv"), "--out-dir", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "text,problem",
    [("", "no pairs"), ("f0.nii.gz\n", "row 1: expected"), ("f0.nii.gz,m0.nii.gz,,a\nf1.nii.gz,m1.nii.gz,,a\n", "repeated")],
)
def test_register_pairs_bad_csv_is_one_line(tmp_path, shift_model, capsys, text, problem):
    (tmp_path / "pairs.csv").write_text(text)
    assert (
        main(["register", "--model", str(shift_model), "--pairs", str(tmp_path / "pairs.csv"), "--out-dir", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pairs.csv" in err[0] and problem in err[0]
    assert not (tmp_path / "o").exists()
    assert (
        main(["register", "--pairs", str(tmp_path / "pairs.csv"), "--fixed", "x.nii.gz", "--out-dir", str(tmp_path / "o")]) == 2
    )


@pytest.mark.slow
def test_register_bf16_runs_the_bf16_path_and_stays_within_a_tenth_of_a_voxel(tmp_path):
    """``--bf16`` with a shipped model, in fresh processes (the precision is process-wide): on CPUs with
    AVX512-BF16 the field differs from float32's, by far less than a voxel; elsewhere the log says it was
    ignored and the field is float32's."""
    from crd_jax.ops import native

    shape = (40, 48, 40)
    fixed = _save(tmp_path / "f.nii.gz", _smooth_volume(shape, 0))
    moving = _save(tmp_path / "m.nii.gz", _smooth_volume(shape, 1))
    fields, logs = [], []
    for extra in ([], ["--bf16"]):
        out = tmp_path / ("bf16" if extra else "f32")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "crd_jax",
                "register",
                "--model",
                "lpba40-vm-ll-crd",
                "--fixed",
                fixed,
                "--moving",
                moving,
                "--out-dir",
                str(out),
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        logs.append(proc.stdout)
        fields.append(nib.load(out / "disp.nii.gz").get_fdata())
    difference = float(np.abs(fields[1] - fields[0]).max())
    if native.has_bf16():
        assert f"bfloat16 inputs and weights (--bf16, {native.bf16_engine()})" in logs[1]
        assert 0 < difference < 0.1
    else:
        assert "--bf16 ignored" in logs[1] and difference == 0


@pytest.mark.parametrize("speedup, warned", [(0.49, True), (1.19, True), (2.0, False), (0.0, False)])
def test_register_log_says_when_bf16_cannot_pay_on_this_cpu(monkeypatch, speedup, warned):
    import argparse

    from crd_jax.cli import options as cli
    from crd_jax.ops import native

    monkeypatch.setattr(native, "describe", lambda: "native CPU kernel")
    monkeypatch.setattr(native, "has_bf16", lambda: speedup > 0)
    monkeypatch.setattr(native, "bf16_speedup", lambda: speedup)
    monkeypatch.setattr(native, "bf16_engine", lambda: "avx512-bf16")
    path = cli.conv_path(argparse.Namespace(bf16=True))
    assert ("unlikely to be faster here" in path) == warned
    assert "unlikely" not in cli.conv_path(argparse.Namespace(bf16=False))


def test_bf16_speedup_is_measured_for_each_engine_the_cpu_has():
    from crd_jax.ops import native

    if not native.has_bf16():
        assert native.bf16_speedup() == 0.0
        return
    before = native.bf16_engine()
    try:
        for engine in ("avx512-bf16", "amx"):
            if native.set_bf16_engine(engine) != engine:
                continue
            # Only that a ratio was measured and is remembered: its size depends on the machine's load, and no
            # test asserts a speed (benchmarks/conv_layers.py reports it).
            first = native.bf16_speedup()
            assert np.isfinite(first) and first > 0 and native.bf16_speedup() == first  # once per process and engine
    finally:
        native.set_bf16_engine(before)


def test_parameter_shapes_are_remembered_once_per_architecture_in_the_cache(tmp_path, monkeypatch):
    """The first call computes and stores the shapes (atomically, nothing else left in the folder), later calls
    read them without computing; a folder where the file should be only costs the computation."""
    import os

    from crd_jax.registration.model import _cached_shapes

    monkeypatch.setenv("CRD_JAX_CACHE_DIR", str(tmp_path))
    spec = {"architecture": {"enc": [16, 32]}, "kind": "vm", "factor": 2}
    calls = []

    def compute():
        calls.append(1)
        return {"['a']": (3, 3, 2, 16), "['b']": (16,)}

    first = _cached_shapes(spec, 3, compute)
    assert first == _cached_shapes(spec, 3, compute) == {"['a']": (3, 3, 2, 16), "['b']": (16,)}
    assert len(calls) == 1
    files = os.listdir(tmp_path / "shapes")
    assert len(files) == 1 and files[0].endswith(".json")
    assert _cached_shapes(dict(spec, factor=4), 3, compute) == first and len(calls) == 2  # another architecture
    os.remove(tmp_path / "shapes" / files[0])
    os.mkdir(tmp_path / "shapes" / files[0])
    assert _cached_shapes(spec, 3, compute) == first and len(calls) == 3
