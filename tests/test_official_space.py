"""Issue 30, item 6: ``convert-official`` records the authors' training space (OASIS aligned_norm, LIA, 1 mm,
160x192x224, intensities in [0, 1]), and any model with a geometry record warns once per process when an input
looks out of its training domain (voxel size, field of view, intensity histogram)."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax.data.io import Volume
from crd_jax.interop import official
from crd_jax.registration import checks, space

OASIS_AFFINE = np.array([[-1.0, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])  # aligned_norm.nii.gz


def _crd(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "crd_jax", *map(str, argv)], cwd=cwd, capture_output=True, text=True)


def _brain(shape, seed=0):
    """A ball of textured intensities on a zero background: a skull-stripped image in miniature."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    inside = np.linalg.norm(grid - centre, axis=-1) < 0.4 * min(shape)
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape).astype(np.float32), 1.5)
    return (inside * (0.5 + texture)).astype(np.float32)


def test_the_training_space_is_what_nibabel_reads_from_the_oasis_affine():
    """LIA is the orientation nibabel gives for aligned_norm's stored affine; the converted network sees arrays
    in that stored (NIfTI) order, the authors' (D, H, W) reversed."""
    assert space.axis_codes(OASIS_AFFINE) == official.TRAINING_SPACE["orientation"] == "LIA"
    assert official.TRAINING_SPACE["stored_shape"] == [160, 192, 224]  # their (D, H, W) = (224, 192, 160)
    assert official._kernel(np.zeros((4, 2, 1, 2, 3))).shape == (3, 2, 1, 2, 4)  # (kW, kH, kD) = NIfTI (kX, kY, kZ)


def test_the_recorded_intensity_statistics_come_from_the_reference_pair():
    ref = "/work/shared/official_crd/reference_io.npz"
    try:
        pair = np.load(ref)
    except OSError:
        pytest.skip("the authors' reference pair is not on this machine")
    p99 = np.mean([np.percentile(pair[k], 99) for k in ("fixed", "moving")])
    ratios = []
    for k in ("fixed", "moving"):  # the statistic on all voxels, by numpy directly
        a = pair[k]
        q = np.percentile(a, 99)
        ratios.append(np.median(a[a > 0.1 * q]) / q)
    assert official.TRAINING_INTENSITY["p99"] == pytest.approx(p99, abs=1e-4)
    assert official.TRAINING_INTENSITY["fg_median_ratio"] == pytest.approx(np.mean(ratios), abs=2e-3)


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_convert_records_the_training_space_and_a_card(tmp_path, kind):
    from test_cli import _random_official_state, _write_legacy

    from crd_jax.model_io import load_spec

    _write_legacy(tmp_path / "ck.pth", _random_official_state(kind == "teacher"))
    proc = _crd("convert-official", "--checkpoint", "ck.pth", "--kind", kind, "--out", "conv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((tmp_path / "conv" / "model.json").read_text())
    pre = spec["preprocessing"]
    assert pre["geometry"] == {"orientation": "LIA", "spacing": [1.0, 1.0, 1.0], "stored_shape": [160, 192, 224]}
    assert pre["normalize"] == "none" and pre["intensity"] == {"p99": 0.4275, "fg_median_ratio": 0.702}
    assert spec["card"]["source_checkpoint"] == "ck.pth"
    assert spec["card"]["licence"] == "no licence stated by the authors; for local checks"
    assert "OASIS (neurite-oasis aligned_norm)" in spec["card"]["training_data"]
    assert load_spec(tmp_path / "conv")["card"] == spec["card"]  # the schema accepts it


def test_foreground_median_ratio_against_numpy_on_every_voxel():
    a = _brain((40, 36, 44))
    q = np.percentile(a, 99)
    assert checks.foreground_median_ratio(a) == pytest.approx(np.median(a[a > 0.1 * q]) / q, abs=0.01)
    assert np.isnan(checks.foreground_median_ratio(np.zeros((8, 8, 8))))


def _spec(orientation="RAS", spacing=(1.0, 1.0, 1.0), stored=(32, 32, 32), ratio=None):
    pre = {"geometry": {"orientation": orientation, "spacing": list(spacing), "stored_shape": list(stored)}}
    if ratio is not None:
        pre["intensity"] = {"fg_median_ratio": ratio}
    return {"preprocessing": pre}


def test_out_of_domain_names_each_check():
    data = _brain((32, 32, 32))
    ratio = checks.foreground_median_ratio(data)
    vol = lambda d, zoom=1.0: Volume(d, np.diag([zoom, zoom, zoom, 1.0]), None, "in.nii.gz")  # noqa: E731
    assert checks.out_of_domain(_spec(ratio=ratio), [vol(data)]) is None
    assert checks.out_of_domain({"preprocessing": {}}, [vol(data, 5.0)]) is None  # no geometry record: no check
    assert "voxels of 2.5 x 2.5 x 2.5 mm" in checks.out_of_domain(_spec(ratio=ratio), [vol(data, 2.5)])
    assert checks.out_of_domain(_spec(ratio=ratio), [vol(data, 1.9)]) is None  # within [0.5, 2] per axis: both checks
    assert "field of view of 32 x 32 x 32 mm" in checks.out_of_domain(_spec(ratio=ratio, stored=(12, 12, 12)), [vol(data)])
    assert "intensity histogram" in checks.out_of_domain(_spec(ratio=ratio + 0.2), [vol(data)])
    assert checks.out_of_domain(_spec(ratio=ratio + 0.1), [vol(data)]) is None
    # the default statistic (models without one) is the shipped models' training data's: a brain-like image passes
    # only near it, a mask (ratio 1) does not
    assert "intensity histogram" in checks.out_of_domain(_spec(), [vol((data > 0).astype(np.float32))])


def test_out_of_domain_compares_in_the_models_orientation():
    """A model trained on 16 x 30 x 90 mm in LIA: an LPS image of that field of view is 16 x 90 x 30 mm as stored
    (in domain once reoriented); the same array labelled LIA has 3x and 1/3 the field of view: out."""
    data = _brain((16, 90, 30))
    spec = _spec("LIA", stored=(16, 30, 90), ratio=checks.foreground_median_ratio(data))
    lps = Volume(data, np.diag([-1.0, -1.0, 1.0, 1.0]), None, "lps.nii.gz")
    assert space.axis_codes(lps.affine) == "LPS"
    assert checks.out_of_domain(spec, [lps]) is None
    lia = Volume(data, OASIS_AFFINE, None, "lia.nii.gz")
    assert "field of view" in checks.out_of_domain(spec, [lia])


@pytest.mark.slow
def test_the_real_checkpoint_registers_an_lpba40_like_input_reoriented(tmp_path):
    """The recorded space is used: an LPS input to the converted student is reoriented to LIA (logged)."""
    ck = "/work/shared/official_crd/student_oasis.pth"
    try:
        open(ck, "rb").close()
    except OSError:
        pytest.skip("the authors' checkpoint is not on this machine")
    assert _crd("convert-official", "--checkpoint", ck, "--kind", "student", "--out", "conv", cwd=tmp_path).returncode == 0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(_brain((64, 72, 64)) * 0.6, affine), tmp_path / "f.nii.gz")
    nib.save(nib.Nifti1Image(_brain((64, 72, 64), seed=1) * 0.6, affine), tmp_path / "m.nii.gz")
    proc = _crd(
        "register",
        "--model",
        "conv",
        "--fixed",
        "f.nii.gz",
        "--moving",
        "m.nii.gz",
        "--no-affine",
        "--out-dir",
        "out",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = json.loads((tmp_path / "out" / "registration.json").read_text())
    assert "reoriented LPS -> LIA" in json.dumps(notes), notes


@pytest.mark.slow
def test_register_warns_once_per_process_out_of_domain_and_not_in_domain(tmp_path):
    from model_folders import make_model_folder

    shape = (32, 32, 32)
    fixed, moving = _brain(shape, 0), _brain(shape, 1)
    ratio = round(checks.foreground_median_ratio(fixed), 3)
    geometry = {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "stored_shape": list(shape)}
    make_model_folder(tmp_path / "model", geometry=geometry, intensity={"fg_median_ratio": ratio})
    make_model_folder(tmp_path / "old", label="VM-L (no geometry)")  # e.g. a folder converted before the record
    for name, zoom in (("", 1.0), ("coarse_", 3.0)):  # 3 mm voxels: 3x the voxel size and the field of view
        for stem, data in (("f", fixed), ("m", moving)):
            nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), tmp_path / f"{name}{stem}.nii.gz")
    (tmp_path / "pairs.csv").write_text("fixed,moving\ncoarse_f.nii.gz,coarse_m.nii.gz\ncoarse_m.nii.gz,coarse_f.nii.gz\n")

    inside = _crd("register", "--model", "model", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out-dir", "in", cwd=tmp_path)
    assert inside.returncode == 0, inside.stderr[-2000:]
    assert "training domain" not in inside.stderr, inside.stderr

    batch = _crd("register", "--model", "model", "--pairs", "pairs.csv", "--out-dir", "out", cwd=tmp_path)
    assert batch.returncode == 0, batch.stderr[-2000:]
    # two such pairs, one process: once (with --pairs, in the first pair's line of the log, on stdout)
    assert (batch.stdout + batch.stderr).count("training domain") == 1, batch.stdout + batch.stderr
    line = next(x for x in batch.stdout.splitlines() if "training domain" in x)
    assert "voxels of 3 x 3 x 3 mm" in line and "once per process" in line, line

    single = _crd(
        "register",
        "--model",
        "model",
        "--fixed",
        "coarse_f.nii.gz",
        "--moving",
        "coarse_m.nii.gz",
        "--out-dir",
        "one",
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    warned = [x for x in single.stderr.splitlines() if "training domain" in x]
    assert len(warned) == 1 and warned[0].startswith("crd-jax: warning: "), single.stderr
    record = json.loads((tmp_path / "one" / "registration.json").read_text())
    assert "training domain" in record["warning"]

    old = _crd(
        "register",
        "--model",
        "old",
        "--fixed",
        "coarse_f.nii.gz",
        "--moving",
        "coarse_m.nii.gz",
        "--out-dir",
        "old_out",
        cwd=tmp_path,
    )
    assert old.returncode == 0 and "training domain" not in old.stderr, old.stderr[-2000:]
