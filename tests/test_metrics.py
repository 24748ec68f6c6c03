"""Metrics against closed forms and brute force."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from crd_jax import metrics


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)


@pytest.mark.parametrize(
    "A", [np.array([[0.1, 0.2], [-0.3, 0.05]]), np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.04, 0.2]])]
)
def test_jacobian_of_affine_field_is_matrix_determinant_everywhere(A):
    shape = (6, 7, 8)[: A.shape[0]]
    u = _grid(shape) @ A.T + 0.5
    det = metrics.jacobian_determinant(u)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(len(shape)) + A), rtol=1e-10)
    assert metrics.count_folds(u) == 0
    assert metrics.sdlogj(u) == pytest.approx(0.0, abs=1e-9)


def test_count_folds_on_a_constructed_folding_field():
    """u_0 = -a x_0^2 / 2: analytically det J = 1 - a x_0 inside; one-sided differences at the two ends."""
    n, a = 20, 0.15
    shape = (n, 5, 6)
    x0 = _grid(shape)[..., 0]
    u = np.zeros((*shape, 3))
    u[..., 0] = -a * x0**2 / 2
    det0 = np.array(
        [1 - a * 0.5] + [1 - a * i for i in range(1, n - 1)] + [1 - a * (2 * n - 3) / 2]
    )  # derivative of u_0 along axis 0, np.gradient's stencil on a quadratic
    expected = int(np.sum(det0 <= 0)) * 5 * 6
    assert expected > 0
    assert metrics.count_folds(u) == expected
    assert metrics.percent_folds(u) == pytest.approx(100 * expected / u[..., 0].size)
    # Reflecting an axis folds every voxel.
    flip = np.zeros((*shape, 3))
    flip[..., 1] = -2 * _grid(shape)[..., 1]
    assert metrics.count_folds(flip) == n * 5 * 6


def test_dice_per_label():
    a = np.array([[1, 1, 2, 0], [3, 3, 3, 0]])
    b = np.array([[1, 2, 2, 0], [3, 3, 0, 0]])
    d = metrics.dice(a, b, [1, 2, 3, 4])
    np.testing.assert_allclose(d[:3], [2 * 1 / 3, 2 * 1 / 3, 2 * 2 / 5])
    assert np.isnan(d[3])


def _surface_brute_force(mask):
    out = np.zeros_like(mask)
    for p in itertools.product(*[range(s) for s in mask.shape]):
        if not mask[p]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                if not (0 <= q[axis] < mask.shape[axis]) or not mask[tuple(q)]:
                    out[p] = True
    return out


def _hd95_brute_force(a, b, spacing):
    pa = np.argwhere(_surface_brute_force(a)) * spacing
    pb = np.argwhere(_surface_brute_force(b)) * spacing
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_brute_force_surface_distances():
    rng = np.random.default_rng(0)
    shape = (14, 12, 10)
    g = _grid(shape)
    sa = np.where(((g - [6, 5, 4]) ** 2 / [16, 9, 9]).sum(-1) < 1, 1, 0)
    sb = np.where(((g - [7, 6, 5]) ** 2 / [9, 16, 4]).sum(-1) < 1, 1, 0)
    sa[2:4, 8:11, 1:3] = 2
    sb[3:6, 7:10, 2:5] = 2
    sa[rng.random(shape) < 0.02] = 1
    spacing = np.array([1.0, 1.5, 2.0])
    got = metrics.hd95(sa, sb, [1, 2, 3], spacing)
    for i, label in enumerate([1, 2]):
        np.testing.assert_allclose(got[i], _hd95_brute_force(sa == label, sb == label, spacing), rtol=1e-10)
    assert np.isnan(got[2])


def _hd95_full_volume(seg_a, seg_b, labels, spacing):
    """The definition, on the whole volume for every label (the implementation before cropping)."""
    from crd_jax.metrics import _surface

    out = []
    for label in labels:
        a, b = seg_a == label, seg_b == label
        if not a.any() or not b.any():
            out.append(np.nan)
            continue
        sa, sb = _surface(a), _surface(b)
        db = ndimage.distance_transform_edt(~sb, sampling=spacing)
        da = ndimage.distance_transform_edt(~sa, sampling=spacing)
        out.append(max(np.percentile(db[sa], 95), np.percentile(da[sb], 95)))
    return np.asarray(out)


def test_hd95_cropped_per_label_equals_the_full_volume_computation():
    rng = np.random.default_rng(4)
    shape = (40, 36, 30)
    a = ndimage.median_filter(rng.integers(0, 7, shape), size=5).astype(np.int32)
    b = ndimage.median_filter(rng.integers(0, 7, shape), size=5).astype(np.int32)
    a[0, :, :] = 3  # labels touching the volume border, where the crop margin is clipped
    b[:, -1, :] = 5
    labels = [1, 2, 3, 4, 5, 6, 9]  # 9 is absent: NaN
    spacing = (1.0, 1.2, 0.8)
    np.testing.assert_allclose(metrics.hd95(a, b, labels, spacing), _hd95_full_volume(a, b, labels, spacing), equal_nan=True)


def test_forward_difference_jacobian_matches_a_brute_force_loop_and_counts_a_fold():
    rng = np.random.default_rng(1)
    disp = rng.normal(scale=0.6, size=(5, 4, 6, 3))
    det = metrics.jacobian_determinant_forward(disp)
    assert det.shape == (4, 3, 5)
    for x, y, z in itertools.product(range(4), range(3), range(5)):
        j = np.eye(3)
        for axis, (dx, dy, dz) in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1)]):
            j[:, axis] += disp[x + dx, y + dy, z + dz] - disp[x, y, z]
        assert det[x, y, z] == pytest.approx(np.linalg.det(j))
    fold = np.zeros((4, 4, 4, 3))
    fold[2:, :, :, 0] = -1.5  # x + u(x) steps back by half a voxel: det = 1 - 1.5 < 0 at x = 1
    assert metrics.count_folds(fold, "forward") == 9  # the x = 1 slab of the 3x3x3 voxels with forward neighbours
    assert metrics.count_folds(np.zeros((4, 4, 4, 3)), "forward") == 0
