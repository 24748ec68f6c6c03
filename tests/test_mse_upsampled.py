"""Eq. 8 on the full grid with its gradient on the student's grid (losses.mse_upsampled, spatial.upsample_gram)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from crd_jax import losses
from crd_jax.models.output import ModelOutput
from crd_jax.ops import spatial
from crd_jax.training import distill


@pytest.mark.parametrize("n, k", [(5, 2), (4, 3), (1, 2), (2, 4), (7, 1)])
def test_linear_upsampling_matrix_is_scipys_half_pixel_zoom_with_clamped_edges(n, k):
    x = np.random.default_rng(n * 10 + k).normal(size=n)
    expected = ndimage.zoom(x, k, order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(spatial.linear_upsampling_matrix(n, k) @ x, expected, atol=1e-12)


@pytest.mark.parametrize("shape, k", [((5, 4, 3), 2), ((6, 1), 3), ((1, 2, 7), 2), ((3, 3), 4)])
def test_upsample_gram_is_the_kronecker_product_of_each_axis_utu(shape, k):
    x = np.random.default_rng(1).normal(size=(2, *shape, 3)).astype(np.float32)
    got = np.asarray(spatial.upsample_gram(jnp.asarray(x), k))
    expected = x.astype(np.float64)
    for axis, n in enumerate(shape, start=1):
        u = spatial.linear_upsampling_matrix(n, k)
        expected = np.moveaxis(np.tensordot(u.T @ u, np.moveaxis(expected, axis, 0), axes=1), 0, axis)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _reference(target, low, factor):
    return jnp.mean((target - spatial.upsample_field(low, factor)) ** 2)


@pytest.mark.parametrize("shape, k", [((5, 4, 3), 2), ((3, 2, 2), 3), ((6, 7), 2), ((1, 4, 2), 2), ((4, 5), 3)])
@pytest.mark.parametrize("upsampling", ["native", "stencil"])
def test_mse_upsampled_value_and_gradients_equal_autodiff_of_the_full_grid_mse(shape, k, upsampling):
    rng = np.random.default_rng(2)
    ndim = len(shape)
    low = jnp.asarray(rng.normal(size=(2, *shape, ndim)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, *[s * k for s in shape], ndim)), jnp.float32)
    previous = spatial.upsample_vjp()
    spatial.upsample_vjp(upsampling)
    try:
        v0, g0 = jax.value_and_grad(functools.partial(_reference, factor=k), (0, 1))(target, low)
        v1, g1 = jax.jit(jax.value_and_grad(losses.mse_upsampled, (0, 1)))(target, low)
    finally:
        spatial.upsample_vjp(previous)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1[0]), np.asarray(g0[0]), rtol=1e-5, atol=1e-8)
    scale = float(jnp.abs(g0[1]).max())
    np.testing.assert_allclose(np.asarray(g1[1]), np.asarray(g0[1]), atol=1e-5 * scale)

    # and against numpy: up(phi) with scipy's zoom (float64), the gradient by a central difference (exact for a
    # quadratic up to rounding) along a random direction
    def numpy_loss(low):
        up = np.stack(
            [
                np.stack([ndimage.zoom(low[b, ..., c] * k, k, order=1, mode="nearest", grid_mode=True) for c in range(ndim)], -1)
                for b in range(low.shape[0])
            ]
        )
        return np.mean((np.asarray(target, np.float64) - up) ** 2)

    low64 = np.asarray(low, np.float64)
    np.testing.assert_allclose(float(v1), numpy_loss(low64), rtol=1e-5)
    direction = rng.normal(size=low.shape)
    h = 1e-3
    slope = (numpy_loss(low64 + h * direction) - numpy_loss(low64 - h * direction)) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(g1[1], np.float64) * direction), slope, rtol=1e-4)


def test_mse_upsampled_second_derivative_is_that_of_the_full_grid_mse():
    rng = np.random.default_rng(3)
    low = jnp.asarray(rng.normal(size=(1, 3, 4, 2, 3)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(1, 6, 8, 4, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=low.shape), jnp.float32)
    hvp = lambda f: jax.grad(lambda l: jnp.vdot(jax.grad(lambda m: f(target, m))(l), v))(low)  # noqa: E731 (reverse over reverse)
    np.testing.assert_allclose(
        np.asarray(hvp(losses.mse_upsampled)), np.asarray(hvp(functools.partial(_reference, factor=2))), rtol=1e-4, atol=1e-7
    )


def test_mse_upsampled_refuses_shapes_that_are_not_one_whole_factor_apart():
    low = jnp.zeros((1, 4, 4, 4, 3))
    for bad in [(1, 8, 8, 7, 3), (1, 8, 8, 12, 3), (1, 8, 8, 8, 2), (2, 8, 8, 8, 3)]:
        with pytest.raises(ValueError, match="upsampled by one whole factor"):
            losses.mse_upsampled(jnp.zeros(bad), low)
    np.testing.assert_allclose(float(losses.mse_upsampled(jnp.ones((1, 4, 4, 4, 3)), low)), 1.0)  # factor 1


def test_full_grid_deformation_term_of_a_registrar_output_equals_the_mse_of_the_upsampled_fields():
    rng = np.random.default_rng(4)
    low = jnp.asarray(rng.normal(size=(1, 4, 3, 5, 3)), jnp.float32)
    t = ModelOutput(disp=jnp.asarray(rng.normal(size=(1, 8, 6, 10, 3)), jnp.float32))

    def term(low):
        s = ModelOutput(disp=spatial.upsample_field(low, 2), disp_low=low)  # what a registrar returns (factor 2)
        return distill.deformation_loss(t, s, "full")

    v, g = jax.value_and_grad(term)(low)
    v0, g0 = jax.value_and_grad(lambda l: losses.mse(t.disp, spatial.upsample_field(l, 2)))(low)
    np.testing.assert_allclose(float(v), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), atol=1e-5 * float(jnp.abs(g0).max()))
