"""Random B-spline augmentation and per-stage pair streams, against scipy and closed forms."""

import numpy as np
import pytest
from scipy import ndimage

from crd_jax.data import augment
from crd_jax.data.augment import Augment
from crd_jax.data.loader import PairLoader


def test_cubic_bspline_closed_form_and_partition_of_unity():
    assert augment.cubic_bspline(np.array([0.0]))[0] == pytest.approx(2 / 3)
    assert augment.cubic_bspline(np.array([1.0]))[0] == pytest.approx(1 / 6)
    assert augment.cubic_bspline(np.array([2.0, -2.5]))[:].tolist() == [0.0, 0.0]
    t = np.linspace(0, 1, 11)
    total = sum(augment.cubic_bspline(t - k) for k in range(-3, 4))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


@pytest.mark.parametrize("size,spacing", [(17, 4.0), (20, 6.0), (9, 2.5)])
def test_basis_rows_sum_to_one_and_constant_coefficients_give_a_constant_field(size, spacing):
    w = augment.basis_matrix(size, spacing)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    grid = tuple(augment.control_points(s, spacing) for s in (size, 7, 5))
    field = augment.bspline_field(np.full(grid + (3,), 1.5), (size, 7, 5), spacing)
    np.testing.assert_allclose(field, 1.5, atol=1e-5)


def test_field_equals_scipy_spline_evaluation_of_the_control_values():
    """``map_coordinates(order=3, prefilter=False)`` evaluates a cubic B-spline with the given coefficients:
    an independent implementation of the same sum."""
    rng = np.random.default_rng(0)
    shape, spacing = (13, 10, 11), 3.0
    grid = tuple(augment.control_points(s, spacing) for s in shape)
    coef = rng.normal(size=grid + (3,))
    ours = augment.bspline_field(coef, shape, spacing)
    coords = np.meshgrid(*[np.arange(s) / spacing + 1 for s in shape], indexing="ij")
    for a in range(3):
        ref = ndimage.map_coordinates(coef[..., a], coords, order=3, prefilter=False, mode="nearest")
        np.testing.assert_allclose(ours[..., a], ref, atol=1e-5)


def test_resample_is_identity_for_zero_field_and_shifts_by_integers():
    rng = np.random.default_rng(1)
    vol = rng.random((6, 7, 8)).astype(np.float32)
    zero = np.zeros(vol.shape + (3,), np.float32)
    np.testing.assert_array_equal(augment.resample(vol, zero, 1), vol)
    shift = zero.copy()
    shift[..., 1] = 2.0
    np.testing.assert_allclose(augment.resample(vol, shift, 1)[:, :-2], vol[:, 2:], atol=1e-6)
    labels = rng.integers(0, 5, vol.shape).astype(np.int32)
    half = zero.copy()
    half[..., 0] = 0.4  # nearest neighbour rounds back to the voxel itself
    np.testing.assert_array_equal(augment.resample(labels, half, 0), labels)


def test_random_field_statistics_follow_sigma():
    rng = np.random.default_rng(2)
    field = augment.random_field(rng, (64, 64, 64), Augment("bspline", 8.0, 2.0))
    # interior voxels at control points: variance sum_k B3(k)^2 per axis -> (2/3)^2 + 2 (1/6)^2 = 1/2
    expected = 2.0 * (0.5**1.5)
    assert field[8:-8:8, 8:-8:8, 8:-8:8].std() == pytest.approx(expected, rel=0.15)
    assert np.abs(np.diff(field, axis=0)).max() < 1.5  # smooth at the voxel scale


def test_bad_augment_settings_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        Augment("elastic")
    with pytest.raises(ValueError, match="spacing"):
        Augment("bspline", 0.5, 1.0)
    assert not Augment("bspline", 8.0, 0.0).active


class _Data:
    shape = (12, 12, 12)
    ids = [f"s{i}" for i in range(4)]

    def __len__(self):
        return 4

    def image(self, i):
        x = np.linspace(0, 1, 12, dtype=np.float32)
        return (np.add.outer(np.add.outer(x, x), x) * (i + 1)).astype(np.float32)

    def labels(self, i):
        lab = np.zeros(self.shape, np.int32)
        lab[2:6, 3:9, 4:10] = 7
        lab[6:10, 3:9, 4:10] = 3 + i
        return lab


def test_loader_is_a_pure_function_of_step_with_stage_streams_and_labels():
    base = PairLoader(_Data(), 2, seed=0)
    aug = base.for_stage(0, Augment("bspline", 4.0, 1.5), label_values=[3, 7])
    b1, b2 = aug.batch(5), aug.batch(5)
    for k in ("moving", "fixed", "moving_labels", "fixed_labels"):
        np.testing.assert_array_equal(b1[k], b2[k])
    plain = base.batch(5)
    assert set(plain) == {"moving", "fixed"}
    np.testing.assert_array_equal(plain["fixed"], b1["fixed"])  # only the moving image is deformed
    assert not np.allclose(plain["moving"], b1["moving"])
    assert b1["moving_labels"].dtype == np.int32 and set(np.unique(b1["fixed_labels"])) <= {0, 1, 2}
    assert base.for_stage(1).pairs(5) != base.pairs(5) or base.for_stage(1).pairs(6) != base.pairs(6)
    assert base.for_stage(0).pairs(5) == base.pairs(5)
