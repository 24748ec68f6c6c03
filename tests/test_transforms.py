"""Saved displacements applied to images, label maps and points; the inverse; `crd-jax apply` and the
`register --jacobian/--inverse` outputs."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from crd_jax import transforms
from crd_jax.cli import main as cli
from crd_jax.metrics import jacobian_determinant
from crd_jax.ops.spatial import warp

_C, _S = np.cos(0.3), np.sin(0.3)
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]]) @ np.diag([1.2, 0.9, 1.1])
OBLIQUE[:3, 3] = [-20.0, 15.0, 5.0]


def _field(shape, amplitude=2.0, seed=0):
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.normal(size=(*shape, 3)), (4, 4, 4, 0))
    return (f / np.abs(f).max() * amplitude).astype(np.float32)


def _image(shape, seed=1):
    return ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2).astype(np.float32)


def test_same_grid_linear_equals_our_warp_and_nearest_labels_too():
    shape = (20, 18, 16)
    img, disp = _image(shape), _field(shape)
    got = transforms.apply_to_image(img, OBLIQUE, disp, OBLIQUE, "linear")
    # independent reference: scipy directly at x + u(x) in voxels of the same grid
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), 0).astype(np.float64)
    want = ndimage.map_coordinates(img, grid + np.moveaxis(disp, -1, 0), order=1, mode="nearest")
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and our own JAX warp (border clamping) agrees
    ours = np.asarray(warp(img[None, ..., None], disp[None], order=1))[0, ..., 0]
    np.testing.assert_allclose(got, ours, atol=1e-4)
    labels = (img * 5).astype(np.int16)
    np.testing.assert_array_equal(
        transforms.apply_to_labels(labels, OBLIQUE, disp, OBLIQUE, "nearest"),
        ndimage.map_coordinates(labels, grid + np.moveaxis(disp, -1, 0), order=0, mode="nearest"),
    )


def test_image_on_another_grid_is_sampled_through_its_affine():
    shape = (16, 16, 16)
    img = _image(shape)
    shifted = OBLIQUE.copy()
    shifted[:3, 3] += OBLIQUE[:3, :3] @ np.array([2.0, 0.0, 0.0])  # the image's voxel 0 is the reference's voxel 2
    zero = np.zeros((*shape, 3), np.float32)
    out = transforms.apply_to_image(img, shifted, zero, OBLIQUE, "linear")
    np.testing.assert_allclose(out[2:], img[:-2], atol=1e-5)


def test_onehot_labels_keep_a_constant_map_and_agree_with_nearest_away_from_boundaries():
    shape = (16, 16, 16)
    labels = np.zeros(shape, np.int16)
    labels[4:12, 4:12, 4:12] = 3
    disp = _field(shape, 1.0)
    onehot = transforms.apply_to_labels(labels, np.eye(4), disp, np.eye(4), "onehot")
    nearest = transforms.apply_to_labels(labels, np.eye(4), disp, np.eye(4), "nearest")
    assert set(np.unique(onehot)) <= {0, 3}
    assert np.mean(onehot == nearest) > 0.97
    assert (
        transforms.apply_to_labels(np.full(shape, 7, np.int16), np.eye(4), disp, np.eye(4), "onehot")[2:-2, 2:-2, 2:-2] == 7
    ).all()


def test_points_follow_the_field_in_world_coordinates():
    shape = (12, 12, 12)
    disp = np.zeros((*shape, 3), np.float32)
    disp[..., 0] = 1.5  # one and a half voxels along the first axis everywhere
    p = OBLIQUE[:3, :3] @ np.array([3.0, 4.0, 5.0]) + OBLIQUE[:3, 3]
    moved = transforms.apply_to_points(p[None], disp, OBLIQUE)[0]
    np.testing.assert_allclose(moved, OBLIQUE[:3, :3] @ np.array([4.5, 4.0, 5.0]) + OBLIQUE[:3, 3], atol=1e-9)


def test_inverse_composes_to_the_identity():
    shape = (24, 24, 24)
    u = _field(shape, 2.0)
    v = transforms.invert(u)
    # x + v(x) + u(x + v(x)) = x  <=>  v + u o (id + v) = 0, away from the border
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), 0).astype(np.float64)
    u_at = np.stack(
        [ndimage.map_coordinates(u[..., i], grid + np.moveaxis(v, -1, 0), order=1, mode="nearest") for i in range(3)], -1
    )
    residual = np.abs(v + u_at)[4:-4, 4:-4, 4:-4]
    assert residual.max() < 0.02 and np.abs(u).max() > 1.5


@pytest.mark.parametrize("shape", [(30, 20, 26), (140, 12, 16)])
def test_fast_inverse_solves_the_same_fixed_point_as_the_reference(shape, monkeypatch):
    """invert_fast (coarse grid, then a few full-grid steps in XLA) against invert (scipy, to convergence):
    the same field to 0.02 voxels and a composition residual as small; the second shape exercises the coarse grid
    (a side over COARSE_SIDE, lowered here so that the test stays small)."""
    monkeypatch.setattr(transforms, "COARSE_SIDE", 64)
    u = _field(shape, 2.0)
    ref, fast = transforms.invert(u), transforms.invert_fast(u)
    assert fast.dtype == np.float32 and fast.shape == u.shape
    np.testing.assert_allclose(fast, ref, atol=0.02)
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), 0).astype(np.float64)
    u_at = np.stack(
        [ndimage.map_coordinates(u[..., i], grid + np.moveaxis(fast, -1, 0), order=1, mode="nearest") for i in range(3)], -1
    )
    assert np.abs(fast + u_at)[4:-4, 4:-4, 4:-4].max() < 0.03


def test_apply_and_register_outputs_through_the_command(tmp_path, capsys):
    from test_bad_inputs import _model

    model, _, _ = _model(tmp_path / "model")
    shape = (32, 32, 32)
    f = tmp_path / "f.nii.gz"
    m = tmp_path / "m.nii.gz"
    seg = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(_image(shape, 0), OBLIQUE), str(f))
    nib.save(nib.Nifti1Image(_image(shape, 1), OBLIQUE), str(m))
    nib.save(nib.Nifti1Image((_image(shape, 2) * 6).astype(np.int16), OBLIQUE), str(seg))
    assert (
        cli.main(
            [
                "register",
                "--model",
                str(model),
                "--fixed",
                str(f),
                "--moving",
                str(m),
                "--moving-seg",
                str(seg),
                "--out-dir",
                str(tmp_path / "out"),
                "--jacobian",
                "--inverse",
            ]
        )
        == 0
    )
    assert "folds (det J <= 0):" in capsys.readouterr().out
    disp = np.asarray(nib.load(str(tmp_path / "out" / "disp.nii.gz")).dataobj)
    np.testing.assert_allclose(
        np.asarray(nib.load(str(tmp_path / "out" / "jacobian.nii.gz")).dataobj), jacobian_determinant(disp), rtol=1e-5, atol=1e-5
    )
    assert (tmp_path / "out" / "inverse_disp.nii.gz").exists()
    assert (
        cli.main(
            [
                "apply",
                "--disp",
                str(tmp_path / "out" / "disp.nii.gz"),
                "--reference",
                str(f),
                "--image",
                str(seg),
                "--labels",
                "--interpolation",
                "nearest",
                "--out",
                str(tmp_path / "seg_w.nii.gz"),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(tmp_path / "seg_w.nii.gz")).dataobj),
        np.asarray(nib.load(str(tmp_path / "out" / "warped_seg.nii.gz")).dataobj),
    )
    pts = tmp_path / "pts.csv"
    pts.write_text("0,0,0\nabc,5,-3\n")
    assert (
        cli.main(
            [
                "apply",
                "--disp",
                str(tmp_path / "out" / "disp.nii.gz"),
                "--reference",
                str(f),
                "--points",
                str(pts),
                "--out",
                str(tmp_path / "moved.csv"),
            ]
        )
        == 2
    )  # a row that is not three numbers: one clear line
    pts.write_text("x,y,z\n0,0,0\n10,5,-3\n")  # the header apply itself writes is accepted
    assert (
        cli.main(
            [
                "apply",
                "--disp",
                str(tmp_path / "out" / "disp.nii.gz"),
                "--reference",
                str(f),
                "--points",
                str(pts),
                "--out",
                str(tmp_path / "moved.csv"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "moved.csv").read_text().splitlines()) == 3
    # and apply reads back the file it wrote
    assert (
        cli.main(
            [
                "apply",
                "--disp",
                str(tmp_path / "out" / "disp.nii.gz"),
                "--reference",
                str(f),
                "--points",
                str(tmp_path / "moved.csv"),
                "--out",
                str(tmp_path / "moved2.csv"),
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_instance_optimisation_lowers_the_pair_loss_and_zero_steps_change_nothing(tmp_path):
    import jax
    import jax.numpy as jnp

    from crd_jax.registration import model as inference
    from crd_jax.registration.pipeline import prepare
    from crd_jax.models import Registrar, VoxelMorph

    shape = (32, 32, 32)
    fixed = _image(shape, 0)
    moving = np.asarray(warp(jnp.asarray(fixed)[None, ..., None], jnp.asarray(_field(shape, 2.0, 5))[None]))[0, ..., 0]
    model = Registrar(VoxelMorph(), factor=2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape, 1)), jnp.zeros((1, *shape, 1)))
    prepared, _ = prepare({"normalize": "none"}, 32, fixed, moving)
    start = np.asarray(inference.predict(model, params, prepared.moving, prepared.fixed))
    same, b0, a0 = inference.instance_optimise(model, params, prepared, 0)
    np.testing.assert_allclose(np.asarray(same), start, atol=1e-6)
    assert a0 == pytest.approx(b0)
    _, before, after = inference.instance_optimise(model, params, prepared, 30)
    assert after < before - 0.01
