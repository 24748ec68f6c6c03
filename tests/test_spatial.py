"""Spatial ops against scipy and closed-form cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from crd_jax import metrics
from crd_jax.ops import spatial


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
@pytest.mark.parametrize("order", [0, 1])
def test_warp_matches_scipy_map_coordinates(shape, order):
    rng = _rng(len(shape) + order)
    nd = len(shape)
    image = rng.normal(size=(2, *shape, 2)).astype(np.float32)
    disp = (rng.normal(size=(2, *shape, nd)) * 2.5).astype(np.float32)
    out = np.asarray(spatial.warp(jnp.asarray(image), jnp.asarray(disp), order=order))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    for b in range(2):
        coords = np.moveaxis(grid + disp[b], -1, 0)
        for c in range(2):
            ref = ndimage.map_coordinates(image[b, ..., c], coords, order=order, mode="nearest")
            np.testing.assert_allclose(out[b, ..., c], ref, atol=1e-4)


def test_warp_zero_displacement_is_identity_and_labels_stay_integer():
    rng = _rng(1)
    image = jnp.asarray(rng.normal(size=(1, 5, 6, 7, 1)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 40, size=(1, 5, 6, 7, 1)).astype(np.int32))
    zero = jnp.zeros((1, 5, 6, 7, 3))
    np.testing.assert_array_equal(spatial.warp(image, zero), image)
    warped = spatial.warp(labels, zero + 0.4, order=0)
    assert warped.dtype == jnp.int32
    np.testing.assert_array_equal(warped, labels)


def test_warp_constant_shift_moves_by_that_many_voxels():
    image = jnp.arange(10.0).reshape(1, 10, 1)[:, :, None] * jnp.ones((1, 10, 4, 1))
    disp = jnp.zeros((1, 10, 4, 2)).at[..., 0].set(2.0)
    out = spatial.warp(image, disp)
    np.testing.assert_allclose(out[0, :8, 0, 0], np.arange(2.0, 10.0))
    np.testing.assert_allclose(out[0, 8:, 0, 0], [9.0, 9.0])  # border mode repeats the edge


@pytest.mark.parametrize(
    "shape,target",
    [
        ((8, 12), (4, 6)),
        ((5, 7), (10, 14)),
        ((6, 4, 8), (3, 2, 4)),
        ((3, 4, 5), (6, 8, 10)),
        ((4, 3), (16, 9)),
        ((16, 12), (4, 4)),
        ((6, 10), (4, 15)),
    ],
)
def test_resize_matches_scipy_zoom_half_pixel(shape, target):
    rng = _rng(3)
    x = rng.normal(size=shape).astype(np.float32)
    out = np.asarray(spatial.resize(jnp.asarray(x)[None, ..., None], target))[0, ..., 0]
    zoom = [t / s for t, s in zip(target, shape)]
    if all(t < s for t, s in zip(target, shape)) and all(s == 2 * t for t, s in zip(target, shape)):
        # Halving with half-pixel centres is 2^d average pooling.
        ref = x.reshape([v for t in target for v in (t, 2)]).mean(axis=tuple(range(1, 2 * len(shape), 2)))
    else:
        ref = ndimage.zoom(x, zoom, order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_constant_low_res_shift_becomes_n_times_and_warps_the_same(factor):
    """A constant shift c at 1/n resolution is n*c at full resolution, and warps identically."""
    hi_shape = (32, 24)
    lo_shape = tuple(s // factor for s in hi_shape)
    c = np.array([1.25, -0.5], np.float32)
    disp_lo = jnp.broadcast_to(jnp.asarray(c), (1, *lo_shape, 2))
    disp_hi = spatial.upsample_field(disp_lo, factor)
    np.testing.assert_allclose(disp_hi, np.broadcast_to(factor * c, (1, *hi_shape, 2)), atol=1e-6)
    np.testing.assert_allclose(spatial.downsample_field(disp_hi, factor), disp_lo, atol=1e-6)

    # A linear ramp is reproduced exactly by linear interpolation, so both routes agree away from borders.
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in hi_shape], indexing="ij"), -1)
    image_hi = jnp.asarray((0.7 * grid[..., 0] - 0.3 * grid[..., 1] + 2.0)[None, ..., None])
    image_lo = spatial.resize(image_hi, lo_shape)
    via_low = spatial.resize(spatial.warp(image_lo, disp_lo), hi_shape)
    direct = spatial.warp(image_hi, disp_hi)
    m = int(np.ceil(factor * (np.abs(c).max() + 2)))
    np.testing.assert_allclose(via_low[0, m:-m, m:-m], direct[0, m:-m, m:-m], atol=1e-4)


def _affine_field(shape, A, t):
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    return (grid @ np.asarray(A).T + np.asarray(t)).astype(np.float32)


def test_compose_of_affine_fields_is_exact():
    shape = (20, 22, 18)
    A1 = np.diag([0.05, -0.04, 0.03]) + 0.01
    A2 = np.array([[0.02, 0.01, 0.0], [0.0, -0.03, 0.02], [0.01, 0.0, 0.04]])
    u = _affine_field(shape, A1, [0.5, -0.3, 0.2])
    v = _affine_field(shape, A2, [-0.4, 0.6, 0.1])
    w = spatial.compose(jnp.asarray(u)[None], jnp.asarray(v)[None])[0]
    # compose(u, v)(x) = v(x) + u(x + v(x)), exact for affine u.
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    expected = v + ((grid + v) @ A1.T + np.array([0.5, -0.3, 0.2]))
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(np.asarray(w)[inner], expected[inner], atol=1e-4)


def _smooth_velocity(shape, amplitude, seed=0):
    rng = _rng(seed)
    v = rng.normal(size=(*shape, len(shape)))
    v = ndimage.gaussian_filter(v, sigma=(3,) * len(shape) + (0,))
    v = v / np.abs(v).max() * amplitude
    return jnp.asarray(v.astype(np.float32))[None]


@pytest.mark.parametrize("shape", [(32, 32), (16, 18, 20)])
def test_scaling_and_squaring_is_invertible_and_fold_free(shape):
    v = _smooth_velocity(shape, amplitude=2.0)
    phi = spatial.integrate_velocity(v, steps=7)
    phi_inv = spatial.integrate_velocity(-v, steps=7)
    assert metrics.count_folds(np.asarray(phi[0])) == 0
    residual = spatial.compose(phi, phi_inv)
    inner = (0, *(slice(4, -4),) * len(shape))
    assert float(jnp.max(jnp.abs(residual[inner]))) < 0.05
    assert float(jnp.max(jnp.abs(phi))) > 1.0  # the field really moves things


def test_integrate_zero_steps_is_the_velocity():
    v = _smooth_velocity((8, 8), 1.0)
    np.testing.assert_allclose(spatial.integrate_velocity(v, steps=0), v)


def test_warp_rejects_mismatched_rank():
    with pytest.raises(ValueError):
        spatial.warp(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4, 3)))
