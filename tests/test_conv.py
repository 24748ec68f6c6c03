"""The fast convolution equals lax.conv_general_dilated, in values and gradients."""

import platform
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax.ops import native
from crd_jax.ops.conv import conv, conv_reference, conv_upsampled_concat

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
    # rows shorter than, equal to and just past the edge tiles and the column tiles (W = 1 ... 61)
    ((3, 3, 1), 4, 16, 1, 0.2),
    ((3, 3, 2), 4, 16, 2, 0.2),
    ((3, 4, 17), 5, 16, 1, 0.2),
    ((3, 4, 33), 6, 32, 1, None),
    ((3, 4, 37), 6, 16, 2, 0.2),
    ((2, 3, 61), 3, 40, 1, 0.2),
    ((2, 3, 26), 3, 16, 1, 0.2),
    # few output channels from 16k input channels (the flow head's AVX-512 kernel): interior and edge tiles
    ((4, 5, 19), 16, 3, 1, None),
    ((3, 4, 30), 16, 4, 1, 0.2),
    ((3, 3, 5), 16, 1, 1, 0.2),
    ((3, 4, 13), 32, 2, 2, None),
]


ON_CPU = jax.default_backend() == "cpu"


def test_native_kernel_is_built_on_x86():
    """Otherwise every comparison below would compare lax.conv with itself."""
    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None or not ON_CPU:
        pytest.skip("the native kernel needs x86-64, g++ and JAX on the CPU")
    assert native.available()


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Runs a test on each vector width of the forward kernel (AVX-512 only where the CPU has it)."""
    if not ON_CPU or not native.available():
        yield request.param
        return
    before = native.isa()
    if native.set_isa(request.param) != request.param:
        native.set_isa(before)
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    native.set_isa(before)


@pytest.mark.parametrize("shape,cin,cout,stride,slope", CASES)
def test_conv_matches_lax_values_and_gradients(shape, cin, cout, stride, slope, isa):
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


@pytest.mark.parametrize(
    "shape,kernel,stride,cin,cout",
    [
        ((9, 7, 8), 2, 2, 3, 8),  # kernel 2, stride 2, default padding 1: a residue class starts past dz's first row
        ((8, 8, 8), 2, 2, 1, 16),
        ((8, 9, 10), 4, 2, 4, 4),
        ((10, 11, 7), 3, 3, 2, 8),
        ((9, 7), 2, 2, 3, 8),
        ((12, 10), 4, 3, 2, 5),
    ],
)
def test_strided_input_gradient_of_any_kernel_matches_lax(shape, kernel, stride, cin, cout, isa):
    """The polyphase input gradient for kernels other than 3 (a fork's downsampling layers); kernel 2 with
    stride 2 used to hand the native kernel a negative padding (a heap overrun)."""
    nd = len(shape)
    k1, k2 = jax.random.split(jax.random.PRNGKey(kernel * 10 + stride))
    x = jax.random.normal(k1, (2, *shape, cin))
    w = jax.random.normal(k2, (kernel,) * nd + (cin, cout)) * 0.3
    b = jnp.zeros((cout,))

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, b, stride, negative_slope=0.2)))

    grads = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(x, w)
    grads_ref = jax.grad(loss(conv_reference), argnums=(0, 1))(x, w)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))


def test_the_native_kernel_refuses_a_negative_padding_instead_of_reading_out_of_bounds():
    if not ON_CPU or not native.available():
        pytest.skip("the native kernel is not loaded")
    from crd_jax.ops.conv import _native_forward

    x = jnp.ones((1, 6, 6, 6, 2))
    w = jnp.ones((3, 3, 3, 2, 8))
    with pytest.raises(Exception, match="paddings must not be negative"):
        jax.block_until_ready(
            jax.jit(
                lambda x, w: _native_forward(
                    x, w, jnp.zeros(8), (1, 1, 1), ((-1, 0), (0, 0), (0, 0)), None, out_spatial=(4, 4, 4)
                )
            )(x, w)
        )


UPCAT_CASES = [
    # skip spatial shape, low spatial shape, C_low, C_skip, C_out, slope
    ((8, 10, 12), (4, 5, 6), 32, 2, 16, 0.2),  # VM's last decoder level: 32 upsampled + the 2 images
    ((7, 9, 11), (4, 5, 6), 16, 16, 32, 0.2),  # odd sizes: the upsampled grid is cropped
    ((5, 6, 19), (3, 3, 10), 3, 5, 8, None),
    ((6, 7, 9), (3, 4, 5), 5, 2, 8, 0.2),  # an odd channel total (bf16 pads it to pairs)
    ((9, 13), (5, 7), 32, 16, 32, 0.2),  # 2-D
]


@pytest.mark.parametrize("shape,low_shape,cl,cs,cout,slope", UPCAT_CASES)
def test_upsampled_concat_conv_equals_conv_of_the_concatenation(shape, low_shape, cl, cs, cout, slope, isa):
    nd = len(shape)
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(sum(shape) + cl), 4)
    low = jax.random.normal(k1, (2, *low_shape, cl))
    skip = jax.random.normal(k2, (2, *shape, cs))
    w = jax.random.normal(k3, (3,) * nd + (cl + cs, cout)) * 0.3
    b = jax.random.normal(k4, (cout,))

    def reference(low, skip, w, b):  # numpy's repeat for the upsampling, lax.conv for the convolution
        up = low
        for axis in range(1, nd + 1):
            up = jnp.repeat(up, 2, axis=axis)
        up = up[(slice(None), *(slice(0, s) for s in shape), slice(None))]
        return conv_reference(jnp.concatenate([up, skip], axis=-1), w, b, negative_slope=slope)

    fused = lambda low, skip, w, b: conv_upsampled_concat(low, skip, w, b, negative_slope=slope)  # noqa: E731
    y = jax.jit(fused)(low, skip, w, b)
    np.testing.assert_allclose(y, reference(low, skip, w, b), rtol=1e-4, atol=1e-4)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    grads = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2, 3)))(low, skip, w, b)
    grads_ref = jax.grad(loss(reference), argnums=(0, 1, 2, 3))(low, skip, w, b)
    for g, g_ref in zip(grads, grads_ref):
        scale = float(jnp.max(jnp.abs(g_ref)))
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * scale)


def test_upsampled_concat_conv_runs_the_fused_kernel_on_the_cpu():
    """The fused op is one custom call with no concatenation in the compiled program (else the test above
    would compare the unfused path with itself)."""
    if not ON_CPU or not native.available():
        pytest.skip("the native kernel is not in use")
    low, skip = jnp.ones((1, 4, 5, 6, 32)), jnp.ones((1, 8, 10, 12, 2))
    w, b = jnp.ones((3, 3, 3, 34, 16)), jnp.zeros(16)
    hlo = jax.jit(lambda *a: conv_upsampled_concat(*a, negative_slope=0.2)).lower(low, skip, w, b).as_text()
    assert "crd_conv_upcat_fwd" in hlo and "concatenate" not in hlo


def test_upsampled_concat_conv_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not cover"):
        conv_upsampled_concat(jnp.ones((1, 3, 3, 3, 4)), jnp.ones((1, 8, 6, 6, 2)), jnp.ones((3, 3, 3, 6, 8)), jnp.zeros(8))
    with pytest.raises(ValueError, match="do not fit"):
        conv_upsampled_concat(jnp.ones((1, 4, 3, 3, 4)), jnp.ones((1, 8, 6, 6, 2)), jnp.ones((3, 3, 3, 5, 8)), jnp.zeros(8))


@pytest.fixture
def winograd_switch():
    """The Winograd path needs the AVX-512 kernel; restores both settings after the test."""
    if not ON_CPU or not native.available():
        pytest.skip("the native kernel is not in use")
    isa_before, wino_before, min_before = native.isa(), native.winograd(), native.winograd_min_input_channels()
    if native.set_isa("avx512") != "avx512":
        native.set_isa(isa_before)
        pytest.skip("this CPU lacks AVX-512")
    native.set_winograd_min_input_channels(1)  # the path's arithmetic on layers of any width (the default skips few)
    yield native.set_winograd
    native.set_winograd_min_input_channels(min_before)
    native.set_winograd(wino_before)
    native.set_isa(isa_before)


WINOGRAD_CASES = [
    # spatial shape (widths 1-6 cross the edge tiles; odd sizes end in half tiles), C_in, C_out, slope
    ((4, 6, 8), 16, 16, 0.2),
    ((5, 7, 9), 32, 32, None),
    ((3, 3, 1), 16, 16, 0.2),
    ((2, 3, 2), 8, 32, 0.2),
    ((3, 2, 3), 16, 16, None),
    ((4, 3, 4), 3, 16, 0.2),
    ((3, 4, 5), 17, 48, 0.1),
    ((2, 5, 6), 34, 16, 0.2),
    ((1, 1, 7), 128, 16, 0.2),
    ((6, 5, 33), 48, 32, 0.2),  # rows of more than one chunk of tiles (24)
]


@pytest.mark.parametrize("shape,cin,cout,slope", WINOGRAD_CASES)
def test_winograd_path_matches_lax_and_the_direct_kernel(shape, cin, cout, slope, winograd_switch):
    """F(2x2x2, 3x3x3) and the direct AVX-512 kernel, each against lax.conv; the dispatch counter proves which ran."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(sum(shape) * cin + cout), 3)
    x = jax.random.normal(k1, (2, *shape, cin))
    w = jax.random.normal(k2, (3, 3, 3, cin, cout)) * 0.3
    b = jax.random.normal(k3, (cout,))
    ref = np.asarray(conv_reference(x, w, b, 1, negative_slope=slope))
    fn = jax.jit(lambda x, w, b: conv(x, w, b, 1, negative_slope=slope))
    outputs = {}
    for on in (True, False):
        assert winograd_switch(on) == on
        calls = native.winograd_calls()
        outputs[on] = np.asarray(fn(x, w, b))
        assert native.winograd_calls() - calls == (1 if on else 0)
        np.testing.assert_allclose(outputs[on], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    # the two orders of summation agree to float32 rounding of the largest terms
    assert float(np.abs(outputs[True] - outputs[False]).max()) <= 1e-5 * float(np.abs(ref).max()) + 1e-6


@pytest.mark.parametrize(
    "shape,low_shape,cl,cs,cout",
    [
        ((8, 10, 12), (4, 5, 6), 32, 2, 16),  # VM's last level: the upsampled channels from the coarse grid
        ((6, 4, 10), (3, 2, 5), 16, 16, 32),  # the same with whole vectors of skip channels
        ((2, 2, 2), (1, 1, 1), 32, 5, 16),  # one tile, every neighbour outside
        ((8, 10, 12), (5, 5, 6), 32, 2, 16),  # a coarse grid larger than half the skip (cropped): rows built in full
        ((7, 9, 5), (4, 5, 3), 16, 16, 32),  # odd sizes: rows built in full
        ((6, 4, 3), (3, 2, 2), 5, 3, 16),
    ],
)
def test_winograd_path_of_the_upsampled_concat_conv_matches_the_direct_kernel(shape, low_shape, cl, cs, cout, winograd_switch):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(cl + cs), 4)
    low = jax.random.normal(k1, (2, *low_shape, cl))
    skip = jax.random.normal(k2, (2, *shape, cs))
    w = jax.random.normal(k3, (3, 3, 3, cl + cs, cout)) * 0.3
    b = jax.random.normal(k4, (cout,))
    up = low
    for axis in (1, 2, 3):
        up = jnp.repeat(up, 2, axis=axis)
    up = up[:, : shape[0], : shape[1], : shape[2]]
    ref = np.asarray(conv_reference(jnp.concatenate([up, skip], -1), w, b, negative_slope=0.2))
    fn = jax.jit(lambda *a: conv_upsampled_concat(*a, negative_slope=0.2))
    for on in (True, False):
        winograd_switch(on)
        calls = native.winograd_calls()
        y = np.asarray(fn(low, skip, w, b))
        assert native.winograd_calls() - calls == (1 if on else 0)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_winograd_path_is_not_taken_where_it_does_not_apply(winograd_switch):
    """Stride 2, output channels not a multiple of 16, more than 128 input channels: the direct kernel."""
    winograd_switch(True)
    x = jnp.ones((1, 6, 6, 6, 130))
    cases = [(x[..., :16], 16, 2), (x[..., :16], 24, 1), (x, 16, 1)]
    for xi, cout, stride in cases:
        w = jnp.full((3, 3, 3, xi.shape[-1], cout), 0.01)
        calls = native.winograd_calls()
        y = jax.block_until_ready(conv(xi, w, jnp.zeros(cout), stride))  # ran (asynchronous dispatch) before counting
        assert native.winograd_calls() == calls
        np.testing.assert_allclose(y, conv_reference(xi, w, jnp.zeros(cout), stride), rtol=1e-4, atol=1e-4)


def test_winograd_needs_enough_input_channels_by_default(winograd_switch):
    """Layers of fewer than 8 input channels (the flow head's input gradient has 3) take the direct kernel unless
    the threshold is lowered; both paths equal lax.conv."""
    winograd_switch(True)
    assert native.set_winograd_min_input_channels(8) == 8
    for cin, expected in ((3, 0), (7, 0), (8, 1), (16, 1)):
        x = jax.random.normal(jax.random.PRNGKey(cin), (1, 4, 5, 6, cin))
        w = jax.random.normal(jax.random.PRNGKey(cin + 1), (3, 3, 3, cin, 16)) * 0.3
        b = jnp.zeros(16)
        ref = np.asarray(conv_reference(x, w, b, 1))
        for threshold, calls_wanted in ((8, expected), (1, 1)):
            native.set_winograd_min_input_channels(threshold)
            calls = native.winograd_calls()
            y = np.asarray(conv(x, w, b, 1))
            assert native.winograd_calls() - calls == calls_wanted, (cin, threshold)
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    assert native.set_winograd_min_input_channels(0) == 1  # never below one channel


def test_the_pooled_input_gradient_follows_the_winograd_threshold(winograd_switch):
    """The decoder's upsampled channels' input gradient (the pooled Winograd pass, whose input is the layer's
    output gradient) takes the threshold as the other passes do: a layer of 4 output channels gets the coarse
    correlation by default and the pooled pass only with the threshold lowered; both gradients equal lax's."""
    from crd_jax.ops.conv import _upsampled_concat

    winograd_switch(True)
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(4), 4)
    low, skip = jax.random.normal(k1, (1, 3, 4, 5, 16)), jax.random.normal(k2, (1, 6, 8, 10, 2))
    w, r = jax.random.normal(k3, (3, 3, 3, 18, 4)) * 0.3, jax.random.normal(k4, (1, 6, 8, 10, 4))

    def loss(conv_fn):
        return lambda low, w: jnp.sum(conv_fn(low, w) * r)

    fused = loss(lambda low, w: conv_upsampled_concat(low, skip, w, jnp.zeros(4), negative_slope=0.2))
    ref = jax.grad(
        loss(lambda low, w: conv_reference(_upsampled_concat(low, skip), w, jnp.zeros(4), negative_slope=0.2)), (0, 1)
    )(low, w)
    for threshold, pooled in ((8, False), (4, True)):
        native.set_winograd_min_input_channels(threshold)
        grad = jax.jit(jax.grad(fused, (0, 1)))  # traced afresh under this threshold
        assert ("crd_conv_pooled_t" in grad.lower(low, w).as_text()) == pooled, threshold
        for g, g_ref in zip(grad(low, w), ref):
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(np.abs(g_ref).max()))


def test_the_winograd_threshold_follows_the_environment_at_start_up():
    import os
    import subprocess
    import sys

    if not ON_CPU or not native.available():
        pytest.skip("the native kernel is not in use")
    code = "from crd_jax.ops import native\nprint(native.winograd_min_input_channels())"
    for value, expected in (("3", "3"), ("0", "8"), ("x", "8"), (None, "8")):  # nonsense keeps the default
        env = {k: v for k, v in os.environ.items() if k != "CRD_JAX_WINOGRAD_MIN_CHANNELS"}
        if value is not None:
            env["CRD_JAX_WINOGRAD_MIN_CHANNELS"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected, value


def test_winograd_is_named_by_describe_and_follows_the_environment():
    import os
    import subprocess
    import sys

    if not ON_CPU or not native.available() or native.isa() != "avx512":
        pytest.skip("the Winograd path needs the AVX-512 kernel")
    code = "from crd_jax.ops import native\nprint(native.winograd(), native.describe())"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "CRD_JAX_WINOGRAD": value}
        env.pop("CRD_JAX_ISA", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert out.split()[0] == expected
        assert ("Winograd" in out) == (expected == "True")


def test_conv_default_padding_matches_pytorch_stride2_sampling():
    """Stride-2 output o reads inputs 2o-1, 2o, 2o+1 (PyTorch padding=1), not XLA's 'SAME' (2o..2o+2)."""
    x = jnp.arange(8.0).reshape(1, 8, 1)[:, :, None, :] * jnp.ones((1, 8, 3, 1))  # (1, 8, 3, 1)
    w = jnp.zeros((3, 3, 1, 1)).at[0, 1, 0, 0].set(1.0)  # picks the input at offset -1 along axis 0
    y = conv(x, w, jnp.zeros(1), stride=2)
    np.testing.assert_allclose(y[0, :, 1, 0], [0.0, 1.0, 3.0, 5.0])


def test_conv_rejects_bad_rank():
    with pytest.raises(ValueError):
        conv(jnp.zeros((1, 4, 1)), jnp.zeros((3, 1, 1)), jnp.zeros(1))


@pytest.mark.skipif(not native.available(), reason="the native kernel is not available here")
def test_isa_selection_is_reported_and_checked():
    if not ON_CPU or not native.available():
        pytest.skip("the native kernel is not in use")
    before = native.isa()
    try:
        assert native.set_isa("avx2") == "avx2" and "AVX2" in native.describe()
        assert native.set_isa("avx512") in ("avx2", "avx512")
        with pytest.raises(ValueError):
            native.set_isa("sse")
    finally:
        native.set_isa(before)


@pytest.mark.slow
def test_kernel_threads_follow_the_environment_and_results_do_not_depend_on_them(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, jax.numpy as jnp\nfrom crd_jax.ops import native\nfrom crd_jax.ops.conv import conv\n"
        "x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12, 12, 12, 8)), jnp.float32)\n"
        "w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 8, 16)), jnp.float32)\n"
        "y = np.asarray(conv(x, w, jnp.zeros(16)))\nnp.save('out.npy', y)\nprint(native.isa(), native.threads())\n"
    )
    outs, isas = [], []
    for threads, extra in (("1", {}), ("3", {}), ("2", {"CRD_JAX_ISA": "avx2"})):
        folder = tmp_path / threads
        folder.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "CRD_JAX_ISA"}
        env.update(CRD_JAX_NUM_THREADS=threads, **extra)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=folder)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[-1] == threads
        isas.append(proc.stdout.split()[-2])
        outs.append(np.load(folder / "out.npy"))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-5)
    # CRD_JAX_ISA=avx2 selects the AVX2 path; it sums in another order, so equal up to rounding
    assert isas[2] == "avx2"
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5, atol=1e-5 * float(np.abs(outs[0]).max()))


def _bf16_engines():
    """The engines of the bfloat16 tiles this CPU runs (AMX only where the CPU and the OS give it)."""
    before = native.bf16_engine()
    engines = [e for e in ("avx512-bf16", "amx") if native.set_bf16_engine(e) == e]
    native.set_bf16_engine(before)
    return engines


def _run_on_each_bf16_engine(fn, *args):
    """``fn(*args)`` (a jitted bf16 convolution) on each engine: the engine is chosen when the kernel runs, so
    one compiled program serves both."""
    outputs = {}
    before = native.bf16_engine()
    try:
        for engine in _bf16_engines():
            native.set_bf16_engine(engine)
            outputs[engine] = np.asarray(fn(*args))
    finally:
        native.set_bf16_engine(before)
    return outputs


def _bf16_rounded(a):
    return np.asarray(a).astype(jnp.bfloat16).astype(np.float32)


# Rows of 16 to 70 columns: AMX tiles are 16 output columns, run in pairs; narrower ranges (the edges) fall back to
# VDPBF16PS. Channel counts whose KW x pairs leave a partial last chunk of 16 (tap, pair)s, and strides 1 and 2.
BF16_CASES = [c for c in CASES if c[2] >= 8][::2] + [
    ((3, 4, 40), 16, 16, 1, 0.2),
    ((3, 4, 37), 34, 32, 1, 0.2),
    ((2, 3, 70), 48, 24, 1, None),
    ((3, 4, 67), 32, 8, 2, 0.2),
    ((3, 3, 16), 2, 16, 1, 0.2),
    ((5, 50), 17, 16, 1, 0.2),
]


@pytest.mark.parametrize("shape,cin,cout,stride,slope", BF16_CASES)
def test_bf16_inference_equals_float32_on_bf16_rounded_inputs(shape, cin, cout, stride, slope):
    """The opt-in path rounds input and weights to bfloat16 and sums in float32: the same as lax.conv on the
    rounded values, up to the order of the sums, on each engine (VDPBF16PS, AMX); gradients (training) stay
    float32."""
    if not (ON_CPU and native.has_bf16()):
        pytest.skip("needs the native kernel on a CPU with AVX512-BF16")
    import sys

    conv_module = sys.modules["crd_jax.ops.conv"]
    nd = len(shape)
    rng = np.random.default_rng(7 + cin)
    x = rng.standard_normal((2, *shape, cin), np.float32)
    w = rng.standard_normal((3,) * nd + (cin, cout), np.float32) * 0.3
    b = rng.standard_normal((cout,), np.float32)
    conv_module.bf16_inference(True)
    try:
        ys = _run_on_each_bf16_engine(jax.jit(lambda x, w, b: conv(x, w, b, stride, negative_slope=slope)), x, w, b)
        g = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w, b, stride, negative_slope=slope)))))(w)
    finally:
        conv_module.bf16_inference(False)
    ref = conv_reference(_bf16_rounded(x), _bf16_rounded(w), b, stride, negative_slope=slope)
    for y in ys.values():
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(y - conv_reference(x, w, b, stride, negative_slope=slope)))) > 1e-4  # it did round
    g_ref = jax.grad(lambda w: jnp.sum(jnp.sin(conv_reference(x, w, b, stride, negative_slope=slope))))(w)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g_ref))))


@pytest.mark.parametrize(
    "shape,low_shape,cl,cs,cout,slope",
    [c for c in UPCAT_CASES if c[4] >= 8]
    + [
        ((4, 5, 37), (2, 3, 19), 32, 2, 16, 0.2),  # VM's last level on a row of 37: two AMX tiles and an overlapping pair
        ((3, 4, 20), (2, 2, 10), 16, 16, 32, None),
    ],
)
def test_bf16_upsampled_concat_conv_equals_float32_on_bf16_rounded_inputs(shape, low_shape, cl, cs, cout, slope):
    """The fused decoder step rounds the rows it builds to bfloat16 pairs (odd channel totals padded)."""
    if not (ON_CPU and native.has_bf16()):
        pytest.skip("needs the native kernel on a CPU with AVX512-BF16")
    import sys

    conv_module = sys.modules["crd_jax.ops.conv"]
    nd = len(shape)
    rng = np.random.default_rng(11 + cl)
    low = rng.standard_normal((2, *low_shape, cl), np.float32)
    skip = rng.standard_normal((2, *shape, cs), np.float32)
    w = rng.standard_normal((3,) * nd + (cl + cs, cout), np.float32) * 0.3
    b = rng.standard_normal((cout,), np.float32)
    conv_module.bf16_inference(True)
    try:
        ys = _run_on_each_bf16_engine(jax.jit(lambda *a: conv_upsampled_concat(*a, negative_slope=slope)), low, skip, w, b)
    finally:
        conv_module.bf16_inference(False)
    up = low
    for axis in range(1, nd + 1):
        up = np.repeat(up, 2, axis=axis)
    x = np.concatenate([up[(slice(None), *(slice(0, s) for s in shape), slice(None))], skip], axis=-1)
    ref = conv_reference(_bf16_rounded(x), _bf16_rounded(w), b, negative_slope=slope)
    for y in ys.values():
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(y - conv_reference(x, w, b, negative_slope=slope)))) > 1e-4  # it did round


def test_amx_is_the_bf16_engine_where_the_cpu_has_it():
    """Where the CPU lists AMX-BF16, the kernel asks Linux for the tiles and uses them (else it would silently
    run the slower VDPBF16PS tiles, and the comparisons above would test one engine twice)."""
    if not (ON_CPU and native.has_bf16()):
        pytest.skip("needs the native kernel on a CPU with AVX512-BF16")
    import ctypes

    flags = Path("/proc/cpuinfo").read_text().split()
    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18  # x86-64 Linux
    granted = (
        "amx_bf16" in flags and "amx_tile" in flags and libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    )
    assert _bf16_engines() == (["avx512-bf16", "amx"] if granted else ["avx512-bf16"])


@pytest.mark.parametrize("x_shape", [(1, 4, 4, 4, 0), (1, 4, 4, 0, 3)], ids=["no channels", "width 0"])
def test_an_empty_input_gives_lax_results_and_gradients(x_shape):
    """Nothing empty reaches a native kernel (one divided by a row of 0 bytes): the value and both gradients are
    lax's, zeros of the right shapes."""
    ci = x_shape[-1]
    x = jnp.zeros(x_shape)
    w = jnp.ones((3, 3, 3, ci, 8))
    b = jnp.ones((8,))

    def total(conv_fn, x, w):
        return jnp.sum(conv_fn(x, w, b, (1, 1, 1), None, 0.2))

    got = jax.value_and_grad(lambda x, w: total(conv, x, w), argnums=(0, 1))(x, w)
    want = jax.value_and_grad(lambda x, w: total(conv_reference, x, w), argnums=(0, 1))(x, w)
    for a, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e)
