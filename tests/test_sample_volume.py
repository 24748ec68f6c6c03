"""spatial.sample_volume (what `crd-jax register` warps full-size volumes with): the native kernel and the
map_coordinates fallback against independent numpy/scipy references."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import ndimage as sp_ndimage

from crd_jax.ops import native, spatial

NATIVE = native.available()


def _coords(disp):
    """x + disp(x) in float32, as both paths compute them."""
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in disp.shape[:-1]), indexing="ij")
    return [grid[k] + disp[..., k] for k in range(disp.shape[-1])]


def _round_half_away(c):
    c = c.astype(np.float64)  # exact: c + 0.5 cannot round in float64
    return np.where(c >= 0, np.floor(c + 0.5), np.ceil(c - 0.5))


def _nearest_reference(image, disp):
    idx = [np.clip(_round_half_away(c), 0, n - 1).astype(np.int64) for c, n in zip(_coords(disp), image.shape)]
    return image[tuple(idx)]


def _field(rng, shape, scale, extra=()):
    d = (rng.normal(size=shape + (3,)) * scale).astype(np.float32)
    for where, value in extra:  # far outside the volume, on either side
        d[where] = value
    return d


@pytest.fixture(params=["native", "fallback"])
def path(request, monkeypatch):
    if request.param == "native" and not NATIVE:
        pytest.skip("the native kernel is not available here")
    if request.param == "fallback":
        monkeypatch.setattr(spatial, "sampled_natively", lambda *a: False)
    return request.param


@pytest.mark.parametrize("in_shape, out_shape", [((6, 7, 9), (6, 7, 9)), ((5, 8, 3), (4, 6, 7)), ((1, 1, 1), (2, 3, 2))])
def test_linear_equals_scipy_map_coordinates_with_edges_repeated(path, in_shape, out_shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=in_shape).astype(np.float32)
    disp = _field(rng, out_shape, 2.5, [((0, 0, 0), [-40.0, 0.25, 1e6]), ((-1, -1, -1), [7.5, -1e5, 0.0])])
    out = np.asarray(spatial.sample_volume(jnp.asarray(image), jnp.asarray(disp), order=1))
    expected = sp_ndimage.map_coordinates(
        image.astype(np.float64), [c.astype(np.float64) for c in _coords(disp)], order=1, mode="nearest"
    )
    assert out.dtype == np.float32 and out.shape == out_shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_linear_is_exact_at_integer_shifts_and_identity(path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(5, 6, 7)).astype(np.float32)
    zero = np.zeros((5, 6, 7, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(spatial.sample_volume(jnp.asarray(image), jnp.asarray(zero))), image)
    shift = zero.copy()
    shift[..., 2] = 1.0  # x + 1 along the last axis, the last column repeated
    expected = np.concatenate([image[..., 1:], image[..., -1:]], axis=-1)
    np.testing.assert_array_equal(np.asarray(spatial.sample_volume(jnp.asarray(image), jnp.asarray(shift))), expected)


@pytest.mark.parametrize(
    "dtype, high", [(np.uint8, 255), (np.int16, 30000), (np.uint16, 65535), (np.int32, 2**31 - 1), (np.float32, 1000)]
)
def test_nearest_keeps_the_type_and_rounds_half_away_from_zero(path, dtype, high):
    if path == "fallback" and dtype == np.int32:
        pytest.skip("map_coordinates rounds integer values through float32 (exact only below 2^24)")
    rng = np.random.default_rng(2)
    shape = (6, 5, 8)
    image = rng.integers(0, high, size=shape, endpoint=True).astype(dtype)
    disp = _field(rng, shape, 2.0, [((0, 0, 0), [-30.0, 0.0, 50.0])])
    disp[1] = np.round(disp[1]) + 0.5  # exact halves: ties go away from zero (lax.round), not to even
    disp[2] = np.round(disp[2]) - 0.5
    out = np.asarray(spatial.sample_volume(jnp.asarray(image), jnp.asarray(disp), order=0))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, _nearest_reference(image, disp))


def test_native_and_fallback_agree_inside_jit():
    if not NATIVE:
        pytest.skip("the native kernel is not available here")
    rng = np.random.default_rng(3)
    image = jnp.asarray(rng.normal(size=(7, 8, 9)).astype(np.float32))
    disp = jnp.asarray(_field(rng, (7, 8, 9), 1.5))
    native_out = jax.jit(spatial.sample_volume, static_argnames="order")(image, disp, order=1)
    grid = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in (7, 8, 9)), indexing="ij")
    reference = jax.scipy.ndimage.map_coordinates(image, [grid[k] + disp[..., k] for k in range(3)], order=1, mode="nearest")
    np.testing.assert_allclose(np.asarray(native_out), np.asarray(reference), rtol=1e-6, atol=1e-6)


def test_nan_displacement_gives_nan_not_an_edge_value():
    image = jnp.ones((3, 4, 5), jnp.float32)
    disp = np.zeros((3, 4, 5, 3), np.float32)
    disp[1, 2, 3, 0] = np.nan
    out = np.asarray(spatial.sample_volume(image, jnp.asarray(disp), order=1))
    assert np.isnan(out[1, 2, 3]) and np.isfinite(np.delete(out.ravel(), np.ravel_multi_index((1, 2, 3), out.shape))).all()


def test_bad_shapes_and_order_are_refused():
    with pytest.raises(ValueError):
        spatial.sample_volume(jnp.zeros((3, 4, 5)), jnp.zeros((3, 4, 5, 2)))
    with pytest.raises(ValueError):
        spatial.sample_volume(jnp.zeros((3, 4, 5)), jnp.zeros((3, 4, 5, 3)), order=3)
