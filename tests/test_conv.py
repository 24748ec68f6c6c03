"""The fast convolution equals lax.conv_general_dilated, in values and gradients."""

import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax.ops import native
from crd_jax.ops.conv import conv, conv_reference

CASES = [
    # spatial shape, C_in, C_out, stride, negative slope
    ((7, 9, 11), 5, 3, 1, 0.2),
    ((8, 10, 12), 16, 32, 2, 0.2),
    ((9, 7, 5), 3, 17, 2, None),
    ((5, 6, 7), 34, 16, 1, 0.2),
    ((4, 4, 13), 2, 16, 1, None),
    ((6, 7), 4, 10, 1, None),
    ((9, 8), 3, 17, 2, 0.2),
    ((11, 5), 32, 8, 2, 0.1),
    ((13, 10), 16, 2, 1, 0.2),
]


def test_native_kernel_is_built_on_x86():
    """Otherwise every comparison below would compare lax.conv with itself."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None:
        pytest.skip("the native kernel needs x86-64 and g++")
    assert native.available()


@pytest.mark.parametrize("shape,cin,cout,stride,slope", CASES)
def test_conv_matches_lax_values_and_gradients(shape, cin, cout, stride, slope):
    nd = len(shape)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(sum(shape) + cin), 3)
    x = jax.random.normal(k1, (2, *shape, cin))
    w = jax.random.normal(k2, (3,) * nd + (cin, cout)) * 0.3
    b = jax.random.normal(k3, (cout,))

    y = jax.jit(lambda x, w, b: conv(x, w, b, stride, negative_slope=slope))(x, w, b)
    y_ref = conv_reference(x, w, b, stride, negative_slope=slope)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)

    def loss(fn):
        return lambda x, w, b: jnp.sum(jnp.sin(fn(x, w, b, stride, negative_slope=slope)))

    grads = jax.jit(jax.grad(loss(conv), argnums=(0, 1, 2)))(x, w, b)
    grads_ref = jax.grad(loss(conv_reference), argnums=(0, 1, 2))(x, w, b)
    for g, g_ref in zip(grads, grads_ref):
        scale = float(jnp.max(jnp.abs(g_ref)))
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * scale)


def test_conv_default_padding_matches_pytorch_stride2_sampling():
    """Stride-2 output o reads inputs 2o-1, 2o, 2o+1 (PyTorch padding=1), not XLA's 'SAME' (2o..2o+2)."""
    x = jnp.arange(8.0).reshape(1, 8, 1)[:, :, None, :] * jnp.ones((1, 8, 3, 1))  # (1, 8, 3, 1)
    w = jnp.zeros((3, 3, 1, 1)).at[0, 1, 0, 0].set(1.0)  # picks the input at offset -1 along axis 0
    y = conv(x, w, jnp.zeros(1), stride=2)
    np.testing.assert_allclose(y[0, :, 1, 0], [0.0, 1.0, 3.0, 5.0])


def test_conv_rejects_bad_rank():
    with pytest.raises(ValueError):
        conv(jnp.zeros((1, 4, 1)), jnp.zeros((3, 1, 1)), jnp.zeros(1))
