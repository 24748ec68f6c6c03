"""Affine pre-alignment recovers a known rotation and translation; ITK text export."""

import numpy as np
import pytest
from scipy import ndimage

from crd_jax import affine_align


def _phantom(shape=(48, 48, 40)):
    rng = np.random.default_rng(0)
    img = np.zeros(shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) - (np.asarray(shape) - 1) / 2
    img += np.exp(-np.sum((grid / [14, 10, 9]) ** 2, -1) * 2)  # an ellipsoid "head"
    img += 0.6 * np.exp(-np.sum(((grid - [6, -5, 3]) / 4) ** 2, -1) * 2)  # asymmetric structures
    img += 0.4 * np.exp(-np.sum(((grid - [-8, 6, -4]) / 3) ** 2, -1) * 2)
    img += 0.05 * ndimage.gaussian_filter(rng.random(shape), 2)
    return (img / img.max()).astype(np.float32)


def test_recovers_a_known_rotation_and_translation():
    fixed = _phantom()
    shape = fixed.shape
    angle = np.deg2rad(8.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    c = (np.asarray(shape) - 1) / 2
    t_true = np.array([2.5, -1.5, 1.0])
    # the moving image is the fixed one seen through x -> rot (x - c) + c + t: moving(rot (x - c) + c + t) = fixed(x)
    inv = np.linalg.inv(rot)
    moving = ndimage.affine_transform(fixed, inv, offset=c - inv @ (c + t_true), order=1, mode="nearest")
    result = affine_align.align(fixed, moving)
    np.testing.assert_allclose(result.matrix, rot, atol=0.03)  # an 8 degree rotation is 0.139 off the identity
    np.testing.assert_allclose(result.translation, t_true, atol=0.4)
    assert result.loss_after < result.loss_before
    # the voxel transform and the displacement say the same
    m = result.voxel_transform(shape)
    x = np.array([10.0, 20.0, 5.0])
    np.testing.assert_allclose(m[:3, :3] @ x + m[:3, 3], x + result.displacement(shape)[10, 20, 5], atol=1e-4)


def test_itk_text_flips_ras_to_lps():
    world = np.eye(4)
    world[:3, 3] = [1.0, 2.0, 3.0]
    text = affine_align.itk_affine_text(world)
    params = [float(v) for v in text.split("Parameters: ")[1].split("\n")[0].split()]
    assert params[:9] == [1, 0, 0, 0, 1, 0, 0, 0, 1] and params[9:] == pytest.approx([-1.0, -2.0, 3.0])
    assert "AffineTransform_double_3_3" in text


@pytest.mark.slow
def test_register_with_affine_recovers_the_shift_and_writes_matrices(tmp_path, capsys):
    import nibabel as nib

    from crd_jax.cli import main as cli
    from model_folders import make_model_folder

    fixed = _phantom((48, 48, 48))
    t_true = np.array([3.0, -2.0, 0.0])
    moving = ndimage.shift(fixed, t_true, order=1, mode="nearest")  # moving(x) = fixed(x - t), so moving(x + t) = fixed(x)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for name, data in (("f", fixed), ("m", moving)):
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / f"{name}.nii.gz"))
    model, _, _ = make_model_folder(tmp_path / "model", 48)
    assert (
        cli.main(
            [
                "register",
                "--model",
                str(model),
                "--fixed",
                str(tmp_path / "f.nii.gz"),
                "--moving",
                str(tmp_path / "m.nii.gz"),
                "--out-dir",
                str(tmp_path / "o"),
                "--affine",
            ]
        )
        == 0
    )
    assert "affine pre-alignment" in capsys.readouterr().out
    world = np.loadtxt(tmp_path / "o" / "affine.txt")
    # moving(x + t) = fixed(x): the fixed world point p corresponds to the moving world point p + t
    np.testing.assert_allclose(world[:3, :3], np.eye(3), atol=0.03)
    np.testing.assert_allclose(world[:3, 3], t_true, atol=0.5)
    assert "AffineTransform_double_3_3" in (tmp_path / "o" / "affine_itk.txt").read_text()
    warped = np.asarray(nib.load(str(tmp_path / "o" / "warped.nii.gz")).dataobj)
    assert np.abs(warped - fixed)[8:-8, 8:-8, 8:-8].mean() < 0.3 * np.abs(moving - fixed)[8:-8, 8:-8, 8:-8].mean()
