"""The training path's backward formulations (issue 26) against independent references, values and gradients:

* the decoder's ``conv(concat([up(low), skip]))`` differentiated on the coarse grid (``upcat_backward="coarse"``)
  against ``lax.conv`` of the explicit concatenation (numpy's ``repeat`` for the upsampling) and against the
  concatenated formulation, 2-D and 3-D, odd coarse sizes, several kernel sizes;
* the integer-factor linear upsampling's stencil transpose against JAX's transpose of the forward and against
  the explicit matrix of the linear map (numpy);
* the native upsampling by whole factors (``csrc/upsample_linear_cpu.cc``, ``upsample_vjp="native"``) and its
  transpose against the same numpy matrices applied axis by axis, 2-D and 3-D, a different factor per axis, odd
  sizes, batches and channels, and against the stencil (values and gradients).
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax.ops import native
from crd_jax.ops.conv import conv_reference, conv_upsampled_concat
from crd_jax.ops.spatial import resize, upsample_field

conv_mod = importlib.import_module("crd_jax.ops.conv")
spatial = importlib.import_module("crd_jax.ops.spatial")


@pytest.fixture
def upsample_mode():
    before = spatial.upsample_vjp()
    yield spatial.upsample_vjp
    spatial.upsample_vjp(before)


def _reference_upcat(low, skip, w, b, slope):
    nd = skip.ndim - 2
    up = np.asarray(low)
    for axis in range(1, nd + 1):
        up = np.repeat(up, 2, axis=axis)
    up = jnp.asarray(up[(slice(None), *(slice(0, s) for s in skip.shape[1:-1]), slice(None))])
    return conv_reference(jnp.concatenate([up, skip], axis=-1), w, b, negative_slope=slope)


def _reference_upcat_traced(low, skip, w, b, slope):  # the same with jnp (differentiable)
    nd = skip.ndim - 2
    up = low
    for axis in range(1, nd + 1):
        up = jnp.repeat(up, 2, axis=axis)
    up = up[(slice(None), *(slice(0, s) for s in skip.shape[1:-1]), slice(None))]
    return conv_reference(jnp.concatenate([up, skip], axis=-1), w, b, negative_slope=slope)


COARSE_CASES = [
    # low spatial shape (the skip is exactly twice it), C_low, C_skip, C_out, kernel size, slope
    ((4, 5, 6), 32, 2, 16, 3, 0.2),  # VM's last decoder level: 32 upsampled + the 2 images
    ((3, 5, 7), 16, 16, 32, 3, 0.2),  # odd coarse sizes
    ((2, 3, 9), 5, 3, 8, 3, None),  # channels that fill no vector
    ((1, 2, 3), 4, 4, 16, 3, 0.2),  # a coarse axis of one voxel
    ((3, 4, 5), 6, 2, 8, 1, 0.2),  # 1^3 kernel: two taps per axis on the coarse grid
    ((3, 3, 4), 4, 2, 8, 5, None),  # 5^3 kernel
    ((5, 7), 32, 16, 32, 3, 0.2),  # 2-D
    ((3, 6), 3, 2, 5, 5, 0.1),  # 2-D, 5^2 kernel
]


@pytest.mark.parametrize("low_shape,cl,cs,cout,k,slope", COARSE_CASES)
def test_coarse_upcat_backward_matches_lax_of_the_concatenation(low_shape, cl, cs, cout, k, slope, upcat_mode):
    upcat_mode("coarse")
    nd = len(low_shape)
    shape = tuple(2 * s for s in low_shape)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(sum(low_shape) + cl + k), 5)
    low = jax.random.normal(k1, (2, *low_shape, cl))
    skip = jax.random.normal(k2, (2, *shape, cs))
    w = jax.random.normal(k3, (k,) * nd + (cl + cs, cout)) * 0.3
    b = jax.random.normal(k4, (cout,))
    fused = lambda low, skip, w, b: conv_upsampled_concat(low, skip, w, b, negative_slope=slope)  # noqa: E731
    y = jax.jit(fused)(low, skip, w, b)
    np.testing.assert_allclose(y, _reference_upcat(low, skip, w, b, slope), rtol=1e-4, atol=1e-4)

    cot = jax.random.normal(k5, y.shape)
    grads = jax.jit(lambda *a: jax.vjp(fused, *a)[1](cot))(low, skip, w, b)
    grads_ref = jax.vjp(lambda *a: _reference_upcat_traced(*a, slope), low, skip, w, b)[1](cot)
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape
        scale = float(jnp.max(jnp.abs(g_ref)))
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("low_shape,cl,cs,cout", [((4, 5, 6), 32, 2, 16), ((3, 5), 8, 8, 16)])
def test_coarse_and_concatenated_backward_agree(low_shape, cl, cs, cout, upcat_mode):
    shape = tuple(2 * s for s in low_shape)
    nd = len(shape)
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
    args = (
        jax.random.normal(k1, (1, *low_shape, cl)),
        jax.random.normal(k2, (1, *shape, cs)),
        jax.random.normal(k3, (3,) * nd + (cl + cs, cout)) * 0.3,
        jax.random.normal(k4, (cout,)),
    )
    loss = lambda *a: jnp.sum(jnp.sin(conv_upsampled_concat(*a, negative_slope=0.2)))  # noqa: E731
    out = {}
    for mode in ("coarse", "concat"):
        upcat_mode(mode)
        out[mode] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)  # traced anew: a new function per mode
    for g, g_ref in zip(out["coarse"], out["concat"]):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))


def test_coarse_tap_matrix_sums_each_fine_tap_over_both_phases():
    m = conv_mod.coarse_tap_matrix(3)
    np.testing.assert_array_equal(m, [[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
    for k in (1, 2, 3, 5):
        assert conv_mod.coarse_tap_matrix(k).sum(axis=0).tolist() == [2.0] * k  # each tap reaches both children


def test_coarse_backward_stores_no_concatenation_and_drops_the_unneeded_skip_gradient(upcat_mode):
    """Where the skip is data (the image pair), XLA removes its input gradient: one native correlation for the
    upsampled channels' input gradient, and no full-size concatenate in the program."""
    if jax.default_backend() != "cpu" or not native.available():
        pytest.skip("the native kernel runs on the CPU")
    upcat_mode("coarse")
    low, skip = jnp.ones((1, 4, 4, 4, 32)), jnp.ones((1, 8, 8, 8, 2))
    w, b = jnp.ones((3, 3, 3, 34, 16)) * 0.01, jnp.zeros(16)
    grad = jax.jit(jax.grad(lambda low, w, b, skip: jnp.sum(conv_upsampled_concat(low, skip, w, b, 0.2)), argnums=(0, 1, 2)))
    text = grad.lower(low, w, b, skip).compile().as_text()
    # dlow only (dskip was dropped): the pooled Winograd pass where it runs, else the coarse correlation
    dlow_target = "crd_conv_pooled_t" if native.winograd() else "crd_conv_fwd"
    assert text.count(f'custom_call_target="{dlow_target}"') == 1
    assert text.count('custom_call_target="crd_conv_fwd"') == (dlow_target == "crd_conv_fwd")
    # coarse and skip weight gradients: an 8^3 fine grid is below the fused weight gradient's 16^3
    assert text.count('custom_call_target="crd_conv_wgrad"') == 2
    assert "f32[1,8,8,8,34]" not in text


def test_upcat_backward_setting_is_checked(upcat_mode):
    with pytest.raises(ValueError):
        upcat_mode("fused")
    assert upcat_mode() in ("coarse", "coarse_split", "coarse_direct", "concat")


POOLED_CASES = [
    # low spatial shape, C_low, C_skip, C_out, batch
    ((4, 5, 6), 32, 2, 16, 1),  # VM's last decoder level: odd and even coarse sizes, the images as the skip
    ((3, 3, 3), 16, 16, 32, 2),  # a batch, skip channels with a gradient of their own
    ((1, 1, 2), 16, 3, 48, 1),  # single-voxel coarse axes (every tile at an edge), three output vectors
    ((2, 3, 26), 48, 1, 16, 1),  # a row of 26 tiles (more than a chunk of 24), 48 low channels
    ((2, 2, 3), 16, 2, 24, 1),  # 24 output channels: the input transform's masked loads of dz
]


@pytest.mark.skipif(not native.winograd(), reason="the Winograd path needs the native kernel on AVX-512")
@pytest.mark.parametrize("low_shape,cl,cs,cout,batch", POOLED_CASES)
def test_pooled_winograd_input_gradient_matches_lax_and_the_coarse_correlation(low_shape, cl, cs, cout, batch, upcat_mode):
    # d low = the fine grid's input gradient summed over each 2x2x2 block (csrc ConvPooledT: 27 of 64 products)
    rng = np.random.default_rng(sum(low_shape) + cl)
    low = jnp.asarray(rng.standard_normal((batch, *low_shape, cl)), jnp.float32)
    skip = jnp.asarray(rng.standard_normal((batch, *(2 * n for n in low_shape), cs)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 3, cl + cs, cout)), jnp.float32)
    b = jnp.zeros((cout,), jnp.float32)
    r = jnp.asarray(rng.standard_normal((batch, *skip.shape[1:-1], cout)), jnp.float32)
    loss = lambda low, skip, w: jnp.sum(conv_upsampled_concat(low, skip, w, b, negative_slope=0.2) * r)  # noqa: E731
    ref = jax.grad(lambda low, skip, w: jnp.sum(_reference_upcat_traced(low, skip, w, b, 0.2) * r), argnums=(0, 1, 2))
    want = ref(low, skip, w)
    got = {}
    calls = {}
    for mode in ("coarse", "coarse_direct"):
        upcat_mode(mode)
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        assert ("crd_conv_pooled_t" in fn.lower(low, skip, w).as_text()) == (mode == "coarse")
        before = native.winograd_calls()
        got[mode] = jax.block_until_ready(fn(low, skip, w))
        calls[mode] = native.winograd_calls() - before
    assert calls["coarse"] == calls["coarse_direct"] + 1  # the pooled pass counts as a Winograd convolution
    for g, g_direct, g_ref in zip(got["coarse"], got["coarse_direct"], want):
        scale = float(jnp.max(jnp.abs(g_ref))) or 1.0
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-6 * scale)
        np.testing.assert_allclose(g, g_direct, rtol=0, atol=2e-6 * scale)


@pytest.mark.skipif(not native.winograd(), reason="the Winograd path needs the native kernel on AVX-512")
def test_a_compiled_pooled_gradient_still_runs_after_winograd_or_avx512_is_switched_off(upcat_mode):
    # the program chose the pooled pass when it was traced; switched off later, the kernel takes the coarse
    # correlation on the active instruction set instead of refusing
    upcat_mode("coarse")
    rng = np.random.default_rng(7)
    low = jnp.asarray(rng.standard_normal((1, 3, 2, 3, 16)), jnp.float32)
    skip = jnp.asarray(rng.standard_normal((1, 6, 4, 6, 2)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 3, 18, 16)), jnp.float32)
    b = jnp.zeros((16,), jnp.float32)
    fn = jax.jit(jax.grad(lambda low, w: jnp.sum(conv_upsampled_concat(low, skip, w, b, 0.2) ** 2), argnums=(0, 1)))
    assert "crd_conv_pooled_t" in fn.lower(low, w).as_text()
    want = jax.grad(lambda low, w: jnp.sum(_reference_upcat_traced(low, skip, w, b, 0.2) ** 2), argnums=(0, 1))(low, w)
    isa = native.isa()
    try:
        for switch in (lambda: native.set_winograd(False), lambda: native.set_isa("avx2")):
            switch()
            for g, g_ref in zip(fn(low, w), want):
                np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(g_ref))))
    finally:
        native.set_isa(isa)
        native.set_winograd(True)


# --- the decoder step's weight gradient in the Winograd domain (csrc ConvWgradUpcat) -------------------------

UPCAT_WGRAD_CASES = [
    # low spatial shape, C_low, C_skip, C_out, batch
    ((4, 5, 6), 32, 2, 16, 1),  # VM's last decoder level (the images as the skip), odd and even coarse sizes
    ((3, 3, 3), 16, 16, 32, 2),  # a batch; 32 output channels
    ((1, 1, 2), 16, 3, 48, 1),  # single-voxel coarse axes (every tile at an edge), three output vectors
    ((2, 3, 26), 48, 1, 16, 1),  # a row of 26 tiles, 48 low channels
    ((2, 2, 3), 16, 2, 24, 1),  # 24 output channels (the gradient transform's masked loads)
    ((3, 2, 2), 32, 32, 3, 1),  # 3 output channels: the input channels fill the lanes (V broadcast)
    ((2, 3, 2), 16, 17, 20, 1),  # 17 skip channels: two masked skip vectors
    ((2, 2, 3), 16, 5, 1, 2),  # 1 output channel: input lanes, a partial vector after the skipped ones; batch 2
    ((3, 2, 2), 48, 1, 2, 1),  # the same with 48 low channels
]


def _lax_weight_grad_of_the_concatenation(low, skip, dz):
    x = jnp.concatenate([jnp.repeat(jnp.repeat(jnp.repeat(low, 2, 1), 2, 2), 2, 3), skip], axis=-1)
    w0 = jnp.zeros((3, 3, 3, x.shape[-1], dz.shape[-1]), jnp.float32)
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))  # noqa: E731
    return jax.vjp(conv, w0)[1](dz)[0]


@pytest.mark.skipif(native.isa() != "avx512", reason="the Winograd weight gradient needs the native kernel on AVX-512")
@pytest.mark.parametrize("low_shape,cl,cs,cout,batch", UPCAT_WGRAD_CASES)
def test_upcat_weight_gradient_kernel_matches_lax_of_the_explicit_concatenation(low_shape, cl, cs, cout, batch):
    conv_mod = importlib.import_module("crd_jax.ops.conv")
    rng = np.random.default_rng(sum(low_shape) + cl + cs)
    low = jnp.asarray(rng.standard_normal((batch, *low_shape, cl)), jnp.float32)
    skip = jnp.asarray(rng.standard_normal((batch, *(2 * n for n in low_shape), cs)), jnp.float32)
    dz = jnp.asarray(rng.standard_normal((*skip.shape[:-1], cout)), jnp.float32)
    want = _lax_weight_grad_of_the_concatenation(low, skip, dz)
    calls = native.winograd_wgrad_calls()
    # dispatch is asynchronous: the kernel has run (and counted itself) only once the result is ready
    got = jax.block_until_ready(jax.jit(conv_mod._upcat_weight_grad)(low, skip, dz))
    assert native.winograd_wgrad_calls() == calls + 1  # the Winograd pass, not the fallback
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))


@pytest.mark.skipif(native.isa() != "avx512", reason="the Winograd weight gradient needs the native kernel on AVX-512")
def test_a_compiled_upcat_weight_gradient_still_runs_after_its_kernel_or_avx512_is_switched_off():
    # the fallback builds the concatenation and takes the weight-gradient kernel the settings select
    conv_mod = importlib.import_module("crd_jax.ops.conv")
    rng = np.random.default_rng(11)
    low = jnp.asarray(rng.standard_normal((1, 3, 2, 3, 16)), jnp.float32)
    skip = jnp.asarray(rng.standard_normal((1, 6, 4, 6, 3)), jnp.float32)
    dz = jnp.asarray(rng.standard_normal((1, 6, 4, 6, 16)), jnp.float32)
    want = _lax_weight_grad_of_the_concatenation(low, skip, dz)
    fn = jax.jit(conv_mod._upcat_weight_grad)
    wgrad, isa = native.wgrad(), native.isa()
    try:
        for switch in (lambda: native.set_wgrad("blocked"), lambda: native.set_wgrad("rows"), lambda: native.set_isa("avx2")):
            switch()
            calls = native.winograd_wgrad_calls()
            np.testing.assert_allclose(fn(low, skip, dz), want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))
            assert native.winograd_wgrad_calls() == calls
            native.set_wgrad(wgrad)
    finally:
        native.set_isa(isa)
        native.set_wgrad(wgrad)


@pytest.mark.skipif(native.isa() != "avx512", reason="the Winograd weight gradient needs the native kernel on AVX-512")
@pytest.mark.parametrize(
    "low_shape,cl,cs,cout", [((8, 8, 8), 16, 2, 16), ((5, 9, 12), 32, 16, 32), ((8, 8, 9), 32, 4, 16), ((8, 9, 8), 16, 5, 8)]
)
def test_decoder_step_gradients_with_the_fused_weight_gradient_match_lax_and_the_split_one(low_shape, cl, cs, cout, upcat_mode):
    """A skip of at most 4 channels (the image pair at the finest level) takes its weight gradient apart from the
    fused Winograd pass (which then sees the upsampled channels alone: a skip of 0 channels); 5 and more stay in it."""
    rng = np.random.default_rng(cl + cs)
    low = jnp.asarray(rng.standard_normal((1, *low_shape, cl)), jnp.float32)
    skip = jnp.asarray(rng.standard_normal((1, *(2 * n for n in low_shape), cs)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 3, cl + cs, cout)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((cout,)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((1, *skip.shape[1:-1], cout)), jnp.float32)
    loss = lambda low, skip, w, b: jnp.sum(conv_upsampled_concat(low, skip, w, b, negative_slope=0.2) * r)  # noqa: E731
    want = jax.grad(lambda *a: jnp.sum(_reference_upcat_traced(*a, 0.2) * r), argnums=(0, 1, 2, 3))(low, skip, w, b)
    got = {}
    for mode in ("coarse", "coarse_fused_skip", "coarse_split"):
        upcat_mode(mode)
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        text = fn.lower(low, skip, w, b).as_text()
        assert ("crd_conv_wgrad_upcat" in text) == (mode != "coarse_split")
        apart = "x".join(str(n) for n in skip.shape[:-1]) + "x0xf32"  # the fused pass given a skip of no channels
        assert (apart in text) == (mode == "coarse" and cs <= 4)
        got[mode] = fn(low, skip, w, b)
    for g, g_fused, g_split, g_ref in zip(got["coarse"], got["coarse_fused_skip"], got["coarse_split"], want):
        scale = float(jnp.max(jnp.abs(g_ref))) or 1.0
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-6 * scale)
        np.testing.assert_allclose(g_fused, g_ref, rtol=0, atol=2e-6 * scale)
        np.testing.assert_allclose(g, g_split, rtol=0, atol=2e-6 * scale)


# --- the upsampling's transpose ------------------------------------------------------------------------------


def _upsample_matrix(n: int, k: int) -> np.ndarray:
    """The ``(n k, n)`` matrix of half-pixel linear upsampling by ``k`` with the edge repeated (numpy)."""
    m = np.zeros((n * k, n))
    for i in range(n):
        for r in range(k):
            o = (r + 0.5) / k - 0.5
            j = min(max(i + (1 if o > 0 else -1), 0), n - 1)
            m[k * i + r, i] += 1 - abs(o)
            m[k * i + r, j] += abs(o)
    return m


@pytest.mark.parametrize(
    "shape,axis,k",
    [
        ((2, 5, 3, 1), 1, 2),
        ((1, 7, 4, 3), 2, 3),
        ((1, 1, 6, 2), 1, 2),
        ((1, 4, 5, 6, 3), 3, 4),
        ((1, 3, 5, 7, 2), 2, 2),
        ((1, 2, 9), 1, 5),
    ],
)
def test_upsample_transpose_is_the_matrix_transpose(shape, axis, k):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    m = _upsample_matrix(shape[axis], k)
    y = jax.jit(lambda x: spatial._upsample_axis_integer(x, axis, k))(x)
    np.testing.assert_allclose(y, np.moveaxis(np.tensordot(m, np.moveaxis(x, axis, 0), 1), 0, axis), rtol=1e-5, atol=1e-5)
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    dx = jax.jit(lambda g: spatial._upsample_axis_transpose(g, axis, k))(g)
    np.testing.assert_allclose(dx, np.moveaxis(np.tensordot(m.T, np.moveaxis(g, axis, 0), 1), 0, axis), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,factor", [((1, 3, 5, 7, 3), 2), ((2, 4, 3, 2), 2), ((1, 3, 2, 4, 3), 4), ((1, 5, 3, 2), 3)])
def test_upsample_field_gradient_matches_autodiff_of_the_forward(shape, factor, upsample_mode):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    r = jax.random.normal(jax.random.PRNGKey(1), (shape[0], *(s * factor for s in shape[1:-1]), shape[-1]))
    out = {}
    modes = ("stencil", "autodiff") + (("native",) if native.available() else ())
    for mode in modes:
        upsample_mode(mode)
        out[mode] = jax.jit(jax.value_and_grad(lambda x, r: jnp.sum(jnp.sin(upsample_field(x, factor)) * r)))(x, r)
    for mode in modes[1:]:
        np.testing.assert_allclose(out[mode][0], out["stencil"][0], rtol=1e-5)
        np.testing.assert_allclose(out[mode][1], out["stencil"][1], rtol=1e-5, atol=1e-5)


def _separable(x: np.ndarray, matrices) -> np.ndarray:
    """``x (B, *spatial, C)`` with ``matrices[k]`` applied along spatial axis ``k`` (numpy, float64)."""
    y = np.asarray(x, np.float64)
    for axis, m in enumerate(matrices, start=1):
        y = np.moveaxis(np.tensordot(m, np.moveaxis(y, axis, 0), 1), 0, axis)
    return y


NATIVE_UPSAMPLE_CASES = [
    ((1, 3, 5, 7, 3), (2, 2, 2)),  # a field (n = 2), odd sizes
    ((2, 4, 3, 2, 1), (1, 3, 2)),  # batch, a factor of 1 on one axis, a different factor per axis
    ((1, 1, 2, 1, 5), (4, 2, 5)),  # single-voxel axes (every tap clamped), five channels
    ((2, 5, 3, 3), (2, 4)),  # 2-D (D = 1 in the kernel)
    ((1, 1, 1, 2), (3, 1)),  # 2-D, one voxel
    # enough planes for the plane order (upsample_linear_cpu.cc: >= 4 per thread, 2 threads here at most)
    ((1, 9, 5, 7, 3), (2, 2, 2)),  # a field, odd sizes
    ((2, 8, 3, 4, 2), (3, 1, 2)),  # batch (planes of two volumes in one ring), factor 1 on H
    ((1, 10, 2, 3, 1), (1, 4, 3)),  # factor 1 on D: every output plane one input plane
    ((9, 4, 6, 2), (2, 3)),  # 2-D with a batch of 9 single-plane volumes
    ((1, 70, 2, 3, 2), (2, 3, 1)),  # 70 planes: the plane order on up to 17 threads
]


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
@pytest.mark.parametrize("shape,factors", NATIVE_UPSAMPLE_CASES)
def test_native_upsampling_and_its_transpose_are_the_numpy_matrices(shape, factors, upsample_mode):
    upsample_mode("native")
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    target = tuple(n * k for n, k in zip(shape[1:-1], factors))
    mats = [_upsample_matrix(n, k) for n, k in zip(shape[1:-1], factors)]
    fn = jax.jit(lambda x: resize(x, target))
    assert "crd_upsample_linear" in fn.lower(x).as_text()  # the kernel ran, not the stencil
    np.testing.assert_allclose(fn(x), _separable(x, mats), rtol=1e-6, atol=1e-6)
    g = np.random.default_rng(1).standard_normal((shape[0], *target, shape[-1])).astype(np.float32)
    vjp = jax.jit(lambda x, g: jax.vjp(lambda x: resize(x, target), x)[1](g)[0])
    assert "crd_upsample_linear_t" in vjp.lower(x, g).as_text()
    np.testing.assert_allclose(vjp(x, g), _separable(g, [m.T for m in mats]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
def test_native_upsampling_under_vmap_and_where_it_does_not_apply(upsample_mode):
    upsample_mode("native")
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 1, 4, 3, 2, 3))
    got = jax.vmap(lambda v: upsample_field(v, 2))(x)
    upsample_mode("stencil")
    np.testing.assert_allclose(got, jax.vmap(lambda v: upsample_field(v, 2))(x), rtol=1e-6, atol=1e-6)
    upsample_mode("native")
    # not whole factors, a downsampling, float64-free bfloat16 input, corner alignment: XLA's path, no kernel
    for fn, arg in [
        (lambda v: resize(v, (6, 5, 3)), x[0]),
        (lambda v: resize(v, (2, 3, 2)), x[0]),
        (lambda v: resize(v, (8, 6, 4)), x[0].astype(jnp.bfloat16)),
        (lambda v: resize(v, (8, 6, 4), align_corners=True), x[0]),
    ]:
        assert "crd_upsample_linear" not in jax.jit(fn).lower(arg).as_text()


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
def test_native_upsampling_has_gradients_of_gradients_and_no_nan_from_taps_of_weight_zero(upsample_mode):
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 4, 2, 2))
    f = lambda u: jnp.sum(resize(u, (3, 8, 6)) ** 3)  # noqa: E731 (a factor 1 on the first axis)
    gg = lambda v: jnp.sum(jnp.sin(jax.grad(f)(v)))  # noqa: E731
    out = {}
    for mode in ("native", "stencil"):
        upsample_mode(mode)
        out[mode] = jax.jit(jax.grad(gg))(x)
    np.testing.assert_allclose(out["native"], out["stencil"], rtol=1e-4, atol=1e-4)
    upsample_mode("native")
    # NaN and inf reach the outputs they contribute to, as in XLA's stencil: not their neighbours along a factor-1
    # axis, and an inf stays inf (a 2-D array runs as D = 1, an axis of factor 1). (Even factors only: for an odd
    # factor the stencil multiplies its middle phase's neighbour by 0, so a NaN leaks there; the kernel's does not.)
    for x, target in [
        (np.array([0.0, np.nan, 0.0], np.float32).reshape(1, 3, 1, 1, 1), (3, 2, 1)),
        (np.array([1.0, np.inf], np.float32).reshape(1, 1, 2, 1), (2, 4)),
        (np.array([[1.0, np.nan], [2.0, -np.inf]], np.float32).reshape(1, 2, 2, 1), (2, 8)),
    ]:
        native_out = np.asarray(jax.jit(lambda v: resize(v, target))(x))
        upsample_mode("stencil")
        stencil_out = np.asarray(jax.jit(lambda v: resize(v, target))(x))
        upsample_mode("native")
        np.testing.assert_array_equal(np.isnan(native_out), np.isnan(stencil_out))
        np.testing.assert_array_equal(native_out[np.isinf(native_out)], stencil_out[np.isinf(native_out)])
        np.testing.assert_allclose(native_out, stencil_out, rtol=1e-6)


@pytest.mark.skipif(not native.available(), reason="native kernel not built")
def test_a_low_resolution_models_loss_and_gradient_are_the_same_with_the_native_upsampling(upsample_mode):
    # VM-L's training loss (eq. 5: the full-resolution loss of up(phi^L)), end to end through the network
    from crd_jax.losses import registration_loss
    from crd_jax.models.registrar import Registrar
    from crd_jax.models.voxelmorph import VoxelMorph

    rng = np.random.default_rng(5)
    moving, fixed = (jnp.asarray(rng.random((1, 16, 12, 16, 1), np.float32)) for _ in range(2))
    model = Registrar(VoxelMorph(), factor=2)
    params = model.init(jax.random.PRNGKey(0), moving, fixed)
    loss = lambda p: registration_loss(moving, fixed, model.apply(p, moving, fixed).disp)[0]  # noqa: E731
    out = {}
    for mode in ("native", "stencil"):
        upsample_mode(mode)
        fn = jax.jit(jax.value_and_grad(loss))
        out[mode] = fn(params)
        assert ("crd_upsample_linear" in fn.lower(params).as_text()) == (mode == "native")
    np.testing.assert_allclose(out["native"][0], out["stencil"][0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(out["native"][1]), jax.tree_util.tree_leaves(out["stencil"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_upsample_vjp_refuses_unknown_modes(upsample_mode):
    with pytest.raises(ValueError, match="'native', 'stencil' or 'autodiff'"):
        upsample_mode("fast")


def test_resize_by_a_whole_factor_has_second_derivatives(upsample_mode):
    upsample_mode("stencil")
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 4, 2))
    f = lambda x: jnp.sum(resize(x, (6, 8)) ** 3)  # noqa: E731
    hvp = jax.jvp(jax.grad(f), (x,), (jnp.ones_like(x),))[1]
    upsample_mode("autodiff")
    hvp_ref = jax.jvp(jax.grad(f), (x,), (jnp.ones_like(x),))[1]
    np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-4, atol=1e-4)


# --- the native warp and its gradient with respect to the field ------------------------------------------------


@pytest.fixture
def warp_mode():
    before = spatial.warp_gradient()
    yield spatial.warp_gradient
    spatial.warp_gradient(before)


WARP_CASES = [
    # image spatial shape, field spatial shape, channels, displacement scale
    ((5, 6, 7), (5, 6, 7), 1, 1.5),
    ((4, 9, 3), (6, 5, 8), 2, 3.0),  # another grid, coordinates far beyond the image
    ((1, 4, 5), (3, 3, 3), 1, 0.7),  # an axis of one voxel
    ((7, 7, 7), (7, 7, 7), 3, 0.0),  # the identity: corners exactly on voxels
]


@pytest.mark.parametrize("native_mode", ["native", "regather"])
@pytest.mark.parametrize("ishape,oshape,channels,scale", WARP_CASES)
def test_native_warp_matches_map_coordinates_values_and_gradients(ishape, oshape, channels, scale, native_mode, warp_mode):
    if jax.default_backend() != "cpu" or not native.available():
        pytest.skip("the native kernel runs on the CPU")
    warp_mode(native_mode)
    rng = np.random.default_rng(sum(ishape) + channels)
    image = jnp.asarray(rng.standard_normal((2, *ishape, channels)), jnp.float32)
    disp = jnp.asarray(rng.standard_normal((2, *oshape, 3)) * scale, jnp.float32)
    if scale:
        disp = disp.at[0, 0, 0, 0].set(jnp.asarray([-40.0, 0.5, 60.0]))  # far outside on two axes
    g = jnp.asarray(rng.standard_normal((2, *oshape, channels)), jnp.float32)
    y = jax.jit(spatial.warp)(image, disp)
    np.testing.assert_allclose(y, spatial._warp_reference(image, disp), rtol=1e-5, atol=1e-5)
    loss = lambda warp_fn: lambda im, d: jnp.sum(warp_fn(im, d) * g)  # noqa: E731
    gi, gd = jax.jit(jax.grad(loss(spatial.warp), argnums=(0, 1)))(image, disp)
    gi_ref, gd_ref = jax.grad(loss(spatial._warp_reference), argnums=(0, 1))(image, disp)
    np.testing.assert_allclose(gd, gd_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gi, gi_ref, rtol=1e-5, atol=1e-5)


def test_native_warp_gradient_matches_finite_differences(warp_mode):
    """An independent check of the derivative (not autodiff's): central differences inside the cells."""
    if jax.default_backend() != "cpu" or not native.available():
        pytest.skip("the native kernel runs on the CPU")
    warp_mode("native")
    rng = np.random.default_rng(3)
    image = jnp.asarray(rng.standard_normal((1, 6, 5, 7, 1)), jnp.float32)
    disp = np.asarray(rng.uniform(-2, 2, (1, 6, 5, 7, 3)), np.float64)
    disp = np.floor(disp) + np.clip(disp - np.floor(disp), 0.2, 0.8)  # away from cell borders (kinks)
    f = lambda d: jnp.sum(spatial.warp(image, d) ** 2)  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(disp, jnp.float32)))
    h = 1e-2
    for index in [(0, 1, 2, 3, 0), (0, 4, 0, 6, 1), (0, 0, 4, 1, 2), (0, 5, 3, 0, 2)]:
        up, down = disp.copy(), disp.copy()
        up[index] += h
        down[index] -= h
        fd = (float(f(jnp.asarray(up, jnp.float32))) - float(f(jnp.asarray(down, jnp.float32)))) / (2 * h)
        assert abs(grad[index] - fd) < 2e-2 * max(1.0, abs(fd)), (index, grad[index], fd)


def test_native_warp_composes_fields_with_gradients_for_both_arguments(warp_mode):
    """Scaling and squaring differentiates the warped image too (the field composed with itself)."""
    from crd_jax.ops.spatial import integrate_velocity

    v = jax.random.normal(jax.random.PRNGKey(4), (1, 5, 6, 4, 3)) * 2.0
    out = {}
    for mode in ("native", "xla"):
        warp_mode(mode)
        out[mode] = jax.jit(jax.value_and_grad(lambda v: jnp.sum(jnp.sin(integrate_velocity(v, 3)))))(v)
    np.testing.assert_allclose(out["native"][0], out["xla"][0], rtol=1e-5)
    np.testing.assert_allclose(out["native"][1], out["xla"][1], rtol=1e-4, atol=1e-5)


def test_training_warp_gradient_is_one_pass_with_its_derivative_saved(warp_mode):
    """The default: one crd_warp_linear call writes the sample and its derivative; no second gather pass."""
    if jax.default_backend() != "cpu" or not native.available():
        pytest.skip("the native kernel runs on the CPU")
    warp_mode("native")
    image, disp = jnp.ones((1, 4, 5, 6, 1)), jnp.zeros((1, 4, 5, 6, 3))
    text = jax.jit(jax.grad(lambda d: jnp.sum(spatial.warp(image, d) ** 2))).lower(disp).compile().as_text()
    assert "crd_warp_linear" in text and "crd_warp_grad" not in text
    warp_mode("regather")
    text = jax.jit(jax.grad(lambda d: jnp.sum(spatial.warp(image, d) ** 2))).lower(disp).compile().as_text()
    assert "crd_warp_grad" in text and "crd_warp_linear" not in text


def test_native_warp_leaves_other_warps_to_map_coordinates(warp_mode):
    warp_mode("native")
    image, disp = jnp.ones((1, 4, 5, 1)), jnp.zeros((1, 4, 5, 2))
    text = jax.jit(spatial.warp).lower(image, disp).as_text()  # 2-D
    assert "crd_warp" not in text
    text = (
        jax.jit(lambda i, d: spatial.warp(i, d, mode="zeros"))
        .lower(jnp.ones((1, 3, 3, 3, 1)), jnp.zeros((1, 3, 3, 3, 3)))
        .as_text()
    )
    assert "crd_warp" not in text
    with pytest.raises(ValueError):
        warp_mode("scatter")
