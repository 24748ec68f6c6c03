"""Losses against brute-force numpy and closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax import losses


def _ncc_brute_force(f, m, window, eps=1e-5):
    """Eq. 1 written literally: a loop over voxels and their (zero-padded) windows."""
    shape = f.shape
    half = window // 2
    size = window ** len(shape)
    pad = [(half, half)] * len(shape)
    fp, mp = np.pad(f, pad), np.pad(m, pad)
    total = 0.0
    for p in itertools.product(*[range(s) for s in shape]):
        sl = tuple(slice(i, i + window) for i in p)
        a, b = fp[sl].astype(np.float64), mp[sl].astype(np.float64)
        fm, mm = a.sum() / size, b.sum() / size
        # Zero-padded voxels count in the window (|A(p)| = window^d), as in VoxelMorph.
        cross = np.sum((a - fm) * (b - mm))
        var_f, var_m = np.sum((a - fm) ** 2), np.sum((b - mm) ** 2)
        total += cross * cross / (var_f * var_m + eps)
    return -total / np.prod(shape)


@pytest.mark.parametrize("shape,window", [((8, 9), 3), ((10, 7), 9), ((6, 7, 5), 3), ((5, 6, 7), 5)])
def test_ncc_matches_brute_force(shape, window):
    rng = np.random.default_rng(sum(shape))
    f = rng.random(shape).astype(np.float32)
    m = (0.6 * f + 0.4 * rng.random(shape)).astype(np.float32)
    got = float(losses.ncc(jnp.asarray(f)[None, ..., None], jnp.asarray(m)[None, ..., None], window=window))
    np.testing.assert_allclose(got, _ncc_brute_force(f, m, window), rtol=2e-4)


def test_ncc_of_an_image_with_itself_is_minus_one_where_textured():
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.random((1, 16, 16, 16, 1)).astype(np.float32))
    assert float(losses.ncc(f, f)) < -0.99
    assert float(losses.ncc(f, 2.0 * f)) < -0.99  # invariant to intensity scaling


def test_box_sum_matches_uniform_filter():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    x = rng.random((7, 8, 9)).astype(np.float32)
    got = np.asarray(losses.box_sum(jnp.asarray(x)[None, ..., None], 5))[0, ..., 0]
    ref = ndimage.uniform_filter(x.astype(np.float64), size=5, mode="constant") * 125
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_grad_l2_of_affine_field_is_frobenius_norm_over_ndim_squared():
    A = np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.04, 0.2]])
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in (6, 7, 8)], indexing="ij"), -1)
    u = (grid @ A.T + 1.0).astype(np.float32)[None]
    np.testing.assert_allclose(float(losses.grad_l2(jnp.asarray(u))), np.sum(A**2) / 9, rtol=1e-5)
    assert float(losses.grad_l2(jnp.ones((1, 5, 5, 2)))) == 0.0


def test_mse_and_soft_dice():
    a = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    assert float(losses.mse(a, a + 2)) == pytest.approx(4.0)
    onehot = jax.nn.one_hot(jnp.asarray([[0, 1, 1, 2]]), 3)
    assert float(losses.soft_dice(onehot, onehot)) == pytest.approx(1.0, abs=1e-6)
    other = jax.nn.one_hot(jnp.asarray([[0, 1, 2, 2]]), 3)
    # per label: 2*1/2, 2*1/3, 2*1/3
    assert float(losses.soft_dice(onehot, other)) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3, abs=1e-5)
    with pytest.raises(ValueError):
        losses.mse(a, a[:1])
