"""The Winograd-domain weight gradient (``csrc/conv_wgrad_winograd_avx512.cc``: F(2x2x2, 3x3x3), AVX-512, the
stride-1 3^3 padding-1 layers) against ``jax.vjp`` of ``lax.conv_general_dilated`` and a float64 numpy correlation.

Tolerance. Winograd's transforms add up to four terms per axis before the products (and the back transform halves
and adds again), so its rounding error is a constant factor above the direct sum's, not a different order; the
kernel keeps its sums short (chunks of 32 tiles in registers, float32 over >= 512 tiles, then float64). Measured
against float64 (largest error over the largest entry): on these cases the direct blocked kernel 1.2e-7 to 2.4e-7,
the Winograd kernel 1.6e-7 to 3.4e-7; at 32^3, 16 -> 16, 3.5e-7 (direct) and 3.8e-7 (Winograd); at 64^3 6.9e-7
and 4.2e-7 (one float32 chain over all of a thread's tiles had given 6.3e-6 there). The tests allow 2e-5 of the
largest entry: ~60x what either kernel reaches here, and ~10^4 below what a wrong tap, channel or edge tile gives
(errors of order 1).
"""

import importlib
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from crd_jax.ops import native

conv_module = importlib.import_module("crd_jax.ops.conv")  # the module (crd_jax.ops.conv is also the function)

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None or jax.default_backend() != "cpu",
    reason="the native kernel needs x86-64, g++ and JAX on the CPU",
)

RTOL = 2e-5  # of the largest entry: see the module's docstring

# (spatial size, C_in, C_out): every C_in of {1, 2, 3, 16, 17, 34} and C_out of {3, 8, 16, 17, 32}, odd sizes and a
# size-1 axis (all tiles partial), both orientations of the products (lanes over C_out, or over C_in for the flow
# head's 3 output channels), masked lanes (17, 34).
CASES = [
    ((5, 7, 3), 1, 3),
    ((9, 4, 6), 2, 16),
    ((5, 7, 3), 3, 8),
    ((9, 4, 6), 16, 16),
    ((5, 7, 3), 16, 3),
    ((9, 4, 6), 17, 17),
    ((5, 7, 3), 34, 32),
    ((9, 4, 6), 16, 32),
    ((1, 6, 5), 17, 8),
    ((6, 6, 6), 34, 3),
]


def lax_weight_grad(x, dz, stride=(1, 1, 1)):
    w0 = jnp.zeros((3, 3, 3, x.shape[-1], dz.shape[-1]), jnp.float32)

    def f(w):
        dims = ("NDHWC", "DHWIO", "NDHWC")
        return lax.conv_general_dilated(x, w, stride, [(1, 1)] * 3, dimension_numbers=dims, precision=lax.Precision.HIGHEST)

    return np.asarray(jax.vjp(f, w0)[1](dz)[0])


def float64_weight_grad(x, dz):
    """dw[k, ci, co] = sum_{b, o} x[b, o - 1 + k, ci] dz[b, o, co] in float64 (zero outside the volume)."""
    x, dz = np.asarray(x, np.float64), np.asarray(dz, np.float64)
    d, h, w = x.shape[1:4]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((3, 3, 3, x.shape[-1], dz.shape[-1]))
    for k in np.ndindex(3, 3, 3):
        out[k] = np.einsum("bdhwi,bdhwo->io", xp[:, k[0] : k[0] + d, k[1] : k[1] + h, k[2] : k[2] + w], dz)
    return out


@pytest.fixture
def avx512_wgrad():
    """The AVX-512 width (the Winograd weight gradient exists only there); restores the settings afterwards."""
    if not native.available():
        pytest.skip("the native kernel is not available")
    before = native.isa(), native.wgrad()
    if native.set_isa("avx512") != "avx512":
        native.set_isa(before[0])
        pytest.skip("this CPU lacks AVX-512")
    yield
    native.set_isa(before[0])
    native.set_wgrad(before[1])


def native_weight_grad(x, dz, kernel):
    """The native call under ``kernel``, and whether it took the Winograd path."""
    assert native.set_wgrad(kernel) == kernel
    calls = native.winograd_wgrad_calls()
    got = np.asarray(conv_module._native_weight_grad(x, dz, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3))
    return got, native.winograd_wgrad_calls() > calls


@pytest.mark.parametrize("shape, ci, co", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_winograd_weight_gradient_matches_lax_and_float64(shape, ci, co, avx512_wgrad):
    rng = np.random.default_rng(ci * 100 + co)
    x = jnp.asarray(rng.standard_normal((2, *shape, ci)), jnp.float32)
    dz = jnp.asarray(rng.standard_normal((2, *shape, co)), jnp.float32)
    exact = float64_weight_grad(x, dz)
    scale = np.abs(exact).max()
    got, took = native_weight_grad(x, dz, "winograd")
    assert took, "the Winograd path did not run"
    np.testing.assert_allclose(got, lax_weight_grad(x, dz), rtol=0, atol=RTOL * scale)
    np.testing.assert_allclose(got, exact, rtol=0, atol=RTOL * scale)
    direct, took_direct = native_weight_grad(x, dz, "blocked")
    assert not took_direct
    np.testing.assert_allclose(direct, exact, rtol=0, atol=RTOL * scale)


def test_auto_takes_winograd_where_it_wins_and_the_direct_kernel_elsewhere(avx512_wgrad):
    """The default ("auto"): Winograd for 16 -> 16 from 16^3 up, the blocked kernel for the flow head's 16 -> 3,
    the image pair's 2 -> 16 and small volumes (all slower in the Winograd domain), and for strided layers (not
    covered at all)."""
    rng = np.random.default_rng(0)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    x16 = arr(1, 16, 16, 16, 16)
    assert native_weight_grad(x16, arr(1, 16, 16, 16, 16), "auto")[1]
    assert not native_weight_grad(x16, arr(1, 16, 16, 16, 3), "auto")[1]
    assert not native_weight_grad(arr(1, 16, 16, 16, 2), arr(1, 16, 16, 16, 16), "auto")[1]
    assert not native_weight_grad(arr(1, 8, 8, 8, 16), arr(1, 8, 8, 8, 16), "auto")[1]
    # thin volumes: an axis of 1-2 voxels (a tile's 64 products mostly padding) or fewer planes of tiles than threads
    assert not native_weight_grad(arr(1, 1, 64, 64, 16), arr(1, 1, 64, 64, 16), "auto")[1]
    assert not native_weight_grad(arr(1, 64, 2, 64, 16), arr(1, 64, 2, 64, 16), "auto")[1]
    native.set_wgrad("winograd")  # even where asked for, a stride-2 layer keeps the direct kernel
    calls = native.winograd_wgrad_calls()
    dz = arr(1, 8, 8, 8, 16)
    strided = np.asarray(conv_module._native_weight_grad(x16, dz, (3, 3, 3), (2, 2, 2), ((1, 1),) * 3))  # ran
    assert native.winograd_wgrad_calls() == calls
    reference = lax_weight_grad(x16, dz, (2, 2, 2))  # sums of 512 products: float32 error relative to the largest
    np.testing.assert_allclose(strided, reference, rtol=0, atol=RTOL * np.abs(reference).max())


def test_an_empty_volume_gives_a_zero_gradient_under_every_setting(avx512_wgrad):
    """A width or channel count of 0 never reaches the Winograd kernel (which would divide by a row of 0 bytes)."""
    for kernel in ("winograd", "auto", "blocked"):
        got, took = native_weight_grad(jnp.zeros((1, 4, 4, 0, 16)), jnp.zeros((1, 4, 4, 0, 16)), kernel)
        assert not took and got.shape == (3, 3, 3, 16, 16) and not got.any(), kernel


def test_the_environment_selects_the_kernel_in_a_fresh_process():
    """``CRD_JAX_WGRAD`` as a user sets it: unset gives "auto", each name its kernel (read once, at start-up)."""
    if not native.available():
        pytest.skip("the native kernel is not available")
    code = "from crd_jax.ops import native; print(native.wgrad())"
    for value, expected in ((None, "auto"), ("blocked", "blocked"), ("winograd", "winograd"), ("rows", "rows")):
        env = {k: v for k, v in os.environ.items() if k != "CRD_JAX_WGRAD"}
        if value is not None:
            env["CRD_JAX_WGRAD"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr[-500:])
    # a mistyped name keeps the direct kernel (not the default's Winograd) and says so
    env = dict(os.environ, CRD_JAX_WGRAD="Blocked")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "blocked" and "CRD_JAX_WGRAD='Blocked' is not one of" in out.stderr, out.stderr[-500:]
