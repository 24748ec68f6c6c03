"""The native weight gradient (``crd_conv_wgrad``: the blocked kernel of ``csrc/wgrad_blocked.h`` at both vector
widths, and the earlier "rows" kernel it replaced) against ``jax.vjp`` of ``lax.conv_general_dilated``."""

import importlib
import platform
import shutil

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

# (C_in, C_out): every C_in of {1, 2, 16, 34} and C_out of {1, 3, 8, 16, 17, 32}; the plan vectorises over
# KW * C_in (16 -> 3, 34 -> 8) or over C_out (2 -> 16, 1 -> 32), with masked tails (17, 34) and tiles over 1 or 3 rows.
CHANNELS = [(1, 1), (2, 3), (16, 3), (34, 8), (2, 16), (16, 17), (34, 32), (1, 32), (16, 16)]


def lax_weight_grad(x, dz, kernel, stride, padding):
    nd = x.ndim - 2
    dims = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    w0 = jnp.zeros((*kernel, x.shape[-1], dz.shape[-1]), jnp.float32)

    def f(w):
        return lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=dims, precision=lax.Precision.HIGHEST)

    return jax.vjp(f, w0)[1](dz)[0]


@pytest.fixture(params=[("avx2", "blocked"), ("avx512", "blocked"), ("avx2", "rows")], ids=lambda p: "-".join(p))
def wgrad_kernel(request):
    """Each weight-gradient kernel the machine runs (AVX-512 only where the CPU has it)."""
    if not native.available():
        pytest.skip("the native kernel is not available")
    isa, kernel = request.param
    before = native.isa(), native.wgrad()
    if native.set_isa(isa) != isa:
        native.set_isa(before[0])
        pytest.skip(f"this CPU lacks {isa}")
    assert native.set_wgrad(kernel) == kernel
    yield request.param
    native.set_isa(before[0])
    native.set_wgrad(before[1])


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("s", [1, 2, 3])
def test_weight_gradient_matches_lax(nd, k, s, wgrad_kernel):
    """Kernel sizes 1-4, strides 1-3, odd sizes, batch 1 and 2, paddings that leave edge columns (k // 2) and
    none, every channel pair of CHANNELS; relative to the largest entry, float32 sums over ~10^3 terms."""
    rng = np.random.default_rng(100 * nd + 10 * k + s)
    spatial = (5, 7, 11) if nd == 3 else (9, 13)
    for i, (cin, cout) in enumerate(CHANNELS):
        batch = 1 + i % 2
        lo = (k // 2) if i % 3 else 0  # padding: "same"-like, or none (every column interior)
        padding = tuple((lo, lo) for _ in range(nd))
        x = jnp.asarray(rng.standard_normal((batch, *spatial, cin)), jnp.float32)
        out = conv_module._out_shape(spatial, (k,) * nd, (s,) * nd, padding)
        if min(out) < 1:
            continue
        dz = jnp.asarray(rng.standard_normal((batch, *out, cout)), jnp.float32)
        got = jax.jit(lambda x, dz: conv_module._native_weight_grad(x, dz, (k,) * nd, (s,) * nd, padding))(x, dz)
        ref = lax_weight_grad(x, dz, (k,) * nd, (s,) * nd, padding)
        assert got.shape == ref.shape
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * scale, err_msg=f"C_in {cin}, C_out {cout}")


def test_weight_gradient_of_a_row_narrower_than_the_kernel(wgrad_kernel):
    """Every output column is an edge column (W = 2 < K = 4, padding 2): all of them read zero-padded copies."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 3, 2, 2, 5)), jnp.float32)
    padding = ((2, 1), (2, 2), (2, 2))
    out = conv_module._out_shape((3, 2, 2), (4, 4, 4), (1, 1, 1), padding)
    dz = jnp.asarray(rng.standard_normal((2, *out, 17)), jnp.float32)
    got = conv_module._native_weight_grad(x, dz, (4, 4, 4), (1, 1, 1), padding)
    np.testing.assert_allclose(got, lax_weight_grad(x, dz, (4, 4, 4), (1, 1, 1), padding), rtol=1e-5, atol=1e-5)


def test_wgrad_kernel_selection_is_reported_and_checked():
    if not native.available():
        pytest.skip("the native kernel is not available")
    before = native.wgrad()
    try:
        for name in ("rows", "blocked", "winograd", "auto"):
            assert native.set_wgrad(name) == name == native.wgrad()
        for wrong in ("avx512", "wino"):
            with pytest.raises(ValueError, match="rows.*winograd"):
                native.set_wgrad(wrong)
    finally:
        native.set_wgrad(before)
