"""The native loss kernels against their XLA references: the fused NCC (crd_jax/ops/csrc/ncc_cpu.cc; reference:
``reduce_window`` box sums and JAX's autodiff) and grad-L2 (csrc/grad_l2_cpu.cc; reference: ``jnp.diff``), values
and gradients, 2-D and 3-D, odd sizes, even windows, channels, batches, borders.

Tolerances: both sides sum at most ``window^d`` float32 terms per box in the same axis order; they differ in
where float32 rounding falls (XLA's fusions vs one kernel; the gradient's coefficients are derived by hand here
and by autodiff there), so values agree to ~1e-7 relative and gradients to ~5e-7 of their largest entry. The
bounds below (1e-5 and 2e-5) leave 20-40x room and are still far below any change of the loss itself. grad-L2's
gradient is linear in the field, a few roundings per term either way (2e-6 of its largest entry).
"""

import os
import subprocess
import sys
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax import losses
from crd_jax.ops import grad_l2 as grad_l2_ops
from crd_jax.ops import native
from crd_jax.ops import ncc as ncc_ops
from crd_jax.ops.spatial import upsample_field, warp

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built")


@pytest.fixture
def formulation():
    """Restores the process's NCC formulation after a test that changes it."""
    before = ncc_ops.ncc_formulation()
    yield ncc_ops.ncc_formulation
    ncc_ops.ncc_formulation(before)


def _pair(shape, seed, background=False):
    rng = np.random.default_rng(seed)
    f = rng.random(shape).astype(np.float32)
    m = (0.5 * f + 0.5 * rng.random(shape)).astype(np.float32)
    if background:  # zero borders, as skull-stripped scans have: flat windows, cc = 0 / eps
        sl = (slice(None),) + tuple(slice(0, s // 3) for s in shape[1:-1]) + (slice(None),)
        f[sl] = 0.0
        m[sl] = 0.0
    return jnp.asarray(f), jnp.asarray(m)


CASES = [
    ((2, 7, 10, 12, 1), 4, False),  # even window: asymmetric padding, transposed in the backward (first: the quick
    # tier runs the first case, and only an even window tells the backward's mirrored offset from the forward's)
    ((1, 11, 13, 9, 1), 9, False),  # odd sizes, window larger than an axis
    ((1, 9, 70, 37, 1), 9, True),  # several row blocks (the kernel works in blocks of 32 rows), zero background
    ((1, 5, 66, 20, 2), 5, False),  # two channels
    ((1, 20, 17, 1), 9, False),  # 2-D
    ((2, 70, 45, 3), 3, True),  # 2-D, batch and channels, several row blocks
    ((1, 3, 2, 1, 1), 9, False),  # tiny
    ((2, 23, 40, 64, 1), 5, True),  # rows of whole groups of 4 vectors; more planes than the backward's ring of
    # window slots (it wraps), two volumes, several row blocks
]


@pytest.mark.parametrize("shape,window,background", CASES)
def test_native_ncc_value_and_gradients_match_reference(shape, window, background):
    f, m = _pair(shape, sum(shape), background)
    ref = jax.value_and_grad(lambda f, m: ncc_ops.ncc_reference(f, m, window), argnums=(0, 1))
    got = jax.value_and_grad(lambda f, m: ncc_ops.ncc(f, m, window), argnums=(0, 1))
    (v0, (gf0, gm0)), (v1, (gf1, gm1)) = ref(f, m), got(f, m)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5, atol=1e-7)
    for a, b in ((gm1, gm0), (gf1, gf0)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * scale)


def test_native_ncc_with_one_thread_matches_reference():
    """One thread takes every (volume, block) item in turn, so the backward's ring of planes is reused across
    volumes and row blocks (with two threads the items may split so that no thread reuses it); a fresh process,
    the kernel's thread count read from the environment."""
    code = (
        "import jax, numpy as np\n"
        "from crd_jax.ops import ncc as n\n"
        "rng = np.random.default_rng(0)\n"
        "for shape, w in (((2, 23, 40, 64, 1), 5), ((3, 9, 70, 37, 1), 9), ((2, 70, 45, 3), 3)):\n"
        "    f = rng.random(shape).astype(np.float32); m = (0.5 * f + 0.5 * rng.random(shape)).astype(np.float32)\n"
        "    ref = jax.value_and_grad(lambda f, m: n.ncc_reference(f, m, w), argnums=(0, 1))(f, m)\n"
        "    got = jax.value_and_grad(lambda f, m: n.ncc(f, m, w), argnums=(0, 1))(f, m)\n"
        "    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-5)\n"
        "    for a, b in zip(got[1], ref[1]):\n"
        "        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(np.abs(b).max()))\n"
        "print(n.ncc_formulation())\n"
    )
    env = dict(os.environ, CRD_JAX_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == ncc_ops.ncc_formulation()


def test_native_ncc_vjp_scales_with_the_cotangent_and_runs_jitted():
    f, m = _pair((1, 12, 40, 16, 1), 3)
    value, vjp = jax.vjp(jax.jit(lambda m: ncc_ops.ncc(f, m)), m)
    ref_value, ref_vjp = jax.vjp(lambda m: ncc_ops.ncc_reference(f, m), m)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    got, want = vjp(jnp.float32(-2.5))[0], ref_vjp(jnp.float32(-2.5))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_native_ncc_is_what_losses_ncc_compiles_to(formulation):
    f, m = _pair((1, 10, 12, 14, 1), 5)
    text = jax.jit(jax.grad(lambda m: losses.ncc(f, m))).lower(m).compile().as_text()
    assert "crd_ncc_fwd" in text and "crd_ncc_bwd" in text and "reduce-window" not in text
    formulation("xla")
    text = jax.jit(jax.grad(lambda m: losses.ncc(f, m))).lower(m).compile().as_text()
    assert "crd_ncc" not in text and "reduce-window" in text


def test_registration_loss_gradient_is_the_same_either_way(formulation):
    """What training differentiates: warp + NCC + grad-L2 with respect to the field, all three native against all
    three XLA references."""
    from crd_jax.ops import spatial

    rng = np.random.default_rng(7)
    f, m = _pair((1, 16, 36, 20, 1), 9)
    disp = jnp.asarray(rng.normal(0.0, 1.5, (1, 16, 36, 20, 3)).astype(np.float32))
    loss = jax.jit(jax.value_and_grad(lambda d: losses.registration_loss(m, f, d)[0]))
    warp_before, l2_before = spatial.warp_gradient(), grad_l2_ops.grad_l2_formulation()
    try:
        formulation("xla"), spatial.warp_gradient("xla"), grad_l2_ops.grad_l2_formulation("xla")
        v0, g0 = jax.value_and_grad(lambda d: losses.registration_loss(m, f, d)[0])(disp)
        text = jax.jit(jax.grad(lambda d: losses.registration_loss(m, f, d)[0])).lower(disp).compile().as_text()
        assert 'custom_call_target="crd_' not in text  # the reference: no native kernel at all
        formulation("native"), spatial.warp_gradient("native"), grad_l2_ops.grad_l2_formulation("native")
        v1, g1 = loss(disp)
        text = loss.lower(disp).compile().as_text()
        assert all(k in text for k in ("crd_ncc_fwd", "crd_ncc_bwd", "crd_warp_linear", "crd_grad_l2_fwd"))
    finally:
        spatial.warp_gradient(warp_before), grad_l2_ops.grad_l2_formulation(l2_before)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=2e-5 * float(jnp.max(jnp.abs(g0))))


def test_other_dtypes_and_ranks_take_the_reference():
    f, m = _pair((1, 6, 7, 1), 1)
    np.testing.assert_allclose(
        float(ncc_ops.ncc(f.astype(jnp.bfloat16), m.astype(jnp.bfloat16), 3)),
        float(ncc_ops.ncc_reference(f.astype(jnp.bfloat16), m.astype(jnp.bfloat16), 3)),
    )
    text = jax.jit(lambda f, m: ncc_ops.ncc(f, m, 3)).lower(f[:, :, 0], m[:, :, 0]).compile().as_text()  # 1-D
    assert "crd_ncc" not in text


def test_ncc_formulation_refuses_unknown_modes(formulation):
    with pytest.raises(ValueError, match="'native' or 'xla'"):
        formulation("fast")
    assert formulation() in ("native", "xla")


def test_warped_image_gradient_through_the_native_warp_and_ncc(formulation):
    """The composition of the two native kernels, second-argument gradients only (the fixed image constant)."""
    f, m = _pair((1, 9, 33, 11, 1), 11)
    disp = jnp.full((1, 9, 33, 11, 3), 0.3, jnp.float32)
    g1 = jax.grad(lambda d: losses.ncc(f, warp(m, d)))(disp)
    formulation("xla")
    g0 = jax.grad(lambda d: losses.ncc(f, warp(m, d)))(disp)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=2e-5 * float(jnp.max(jnp.abs(g0))))


@pytest.mark.parametrize("shape", [(1, 7, 9, 11, 3), (2, 5, 6, 40, 3), (1, 13, 17, 2), (2, 3, 33, 2)])
def test_native_grad_l2_value_and_gradient_match_reference(shape):
    disp = jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32))
    v0, g0 = jax.value_and_grad(grad_l2_ops.grad_l2_reference)(disp)
    v1, g1 = jax.jit(jax.value_and_grad(grad_l2_ops.grad_l2))(disp)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=2e-6 * float(jnp.max(jnp.abs(g0))))


def test_native_grad_l2_of_an_affine_field_is_exact_and_of_a_flat_axis_nan_as_the_reference():
    grid = jnp.stack(jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in (4, 5, 6)), indexing="ij"), -1)
    disp = (grid @ jnp.asarray([[0.5, 0.0, 0.0], [0.0, -0.25, 0.0], [0.0, 0.0, 2.0]]))[None]
    np.testing.assert_allclose(float(grad_l2_ops.grad_l2(disp)), (0.25 + 0.0625 + 4.0) / 9, rtol=1e-6)
    flat = jnp.ones((1, 1, 5, 6, 3), jnp.float32)  # an axis of one voxel: jnp.mean of no differences
    assert np.isnan(float(grad_l2_ops.grad_l2(flat))) and np.isnan(float(grad_l2_ops.grad_l2_reference(flat)))


def test_grad_l2_compiles_to_the_native_kernel_or_the_reference():
    disp = jnp.zeros((1, 6, 7, 8, 3), jnp.float32)
    before = grad_l2_ops.grad_l2_formulation()
    try:
        text = jax.jit(jax.value_and_grad(losses.grad_l2)).lower(disp).compile().as_text()
        assert "crd_grad_l2_fwd" in text
        grad_l2_ops.grad_l2_formulation("xla")
        assert "crd_grad_l2" not in jax.jit(jax.grad(losses.grad_l2)).lower(disp).compile().as_text()
        with pytest.raises(ValueError, match="'native' or 'xla'"):
            grad_l2_ops.grad_l2_formulation("fast")
    finally:
        grad_l2_ops.grad_l2_formulation(before)


def _fine_grad_l2_numpy(phi: np.ndarray, factor: int) -> float:
    """L_reg of eq. 2 on ``upsample_field(phi, factor)`` in float64 numpy: the upsampling as dense matrices along
    each axis (half-pixel, edge repeated), then the mean squared forward differences per axis, averaged."""
    from test_training_backward import _upsample_matrix  # the tests' own matrix of the map (not the library's)

    v = np.asarray(phi, np.float64) * factor
    for axis, n in enumerate(phi.shape[1:-1], start=1):
        v = np.moveaxis(np.tensordot(_upsample_matrix(n, factor), np.moveaxis(v, axis, 0), 1), 0, axis)
    ndim = phi.ndim - 2
    return sum(np.mean(np.diff(v, axis=a) ** 2) for a in range(1, ndim + 1)) / ndim


@pytest.mark.parametrize(
    "shape,factor",
    [
        ((1, 5, 6, 7, 3), 2),  # odd sizes
        ((2, 3, 4, 5, 3), 3),  # batch, factor 3
        ((1, 1, 3, 2, 3), 4),  # a one-voxel axis (every tap clamped), factor 4
        ((1, 2, 1, 1, 3), 2),
        ((2, 5, 3, 2), 3),  # 2-D (D = 1 in the kernel)
        ((1, 4, 4, 2), 2),
    ],
)
def test_grad_l2_of_an_upsampled_field_is_taken_on_the_coarse_grid_exactly(shape, factor):
    """grad_l2(upsample_field(phi)) runs on phi's grid (crd_grad_l2_coarse): the same value as the float64 fine-grid
    computation and the same gradient as the fine-grid term (an equal field that is not upsample_field's own
    result takes the fine grid), and the kernel's Z equals its XLA formulation."""
    phi = jnp.asarray(np.random.default_rng(sum(shape) + factor).standard_normal(shape).astype(np.float32))
    coarse = lambda x: grad_l2_ops.grad_l2(upsample_field(x, factor))  # noqa: E731
    fine = lambda x: grad_l2_ops.grad_l2(upsample_field(x, factor) + 0.0)  # noqa: E731 (not the same array)
    assert "crd_grad_l2_coarse" in jax.jit(jax.value_and_grad(coarse)).lower(phi).as_text()
    fine_text = jax.jit(jax.value_and_grad(fine)).lower(phi).as_text()
    assert "crd_grad_l2_fwd" in fine_text and "crd_grad_l2_coarse" not in fine_text
    v1, g1 = jax.jit(jax.value_and_grad(coarse))(phi)
    v0, g0 = jax.jit(jax.value_and_grad(fine))(phi)
    np.testing.assert_allclose(float(v1), _fine_grad_l2_numpy(np.asarray(phi), factor), rtol=2e-6)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=2e-6 * float(jnp.max(jnp.abs(g0))))
    z_native, z_xla = grad_l2_ops._native_z(phi, factor), grad_l2_ops._upsampled_z_xla(phi, factor)
    np.testing.assert_allclose(np.asarray(z_native), np.asarray(z_xla), atol=1e-6 * float(jnp.max(jnp.abs(z_xla))))


def _fine_upsampled_numpy(phi: np.ndarray, factor: int) -> np.ndarray:
    """``upsample_field(phi, factor)`` in float64 numpy (the tests' own dense matrices of the map)."""
    from test_training_backward import _upsample_matrix

    v = np.asarray(phi, np.float64) * factor
    for axis, n in enumerate(phi.shape[1:-1], start=1):
        v = np.moveaxis(np.tensordot(_upsample_matrix(n, factor), np.moveaxis(v, axis, 0), 1), 0, axis)
    return v


@pytest.mark.parametrize(
    "shape,factor",
    [((1, 5, 6, 7, 3), 2), ((2, 3, 4, 5, 3), 3), ((1, 1, 3, 2, 3), 4), ((2, 5, 3, 2), 3), ((1, 4, 4, 2), 2)],
)
def test_the_mse_of_two_upsampled_fields_is_taken_on_the_coarse_grid_exactly(shape, factor):
    """Eq. 8 on the full grid for two coarse fields, mse(up(a), up(b)), runs on their grid (field_mse ->
    mse_of_upsampled, the kernel's "gram" passes): the float64 fine-grid value, the fine-grid term's gradient in
    both arguments, and the kernel's Z equal to its XLA formulation."""
    rng = np.random.default_rng(sum(shape) * factor)
    a, b = (jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    coarse = lambda x, y: grad_l2_ops.field_mse(upsample_field(x, factor), upsample_field(y, factor))  # noqa: E731
    fine = lambda x, y: grad_l2_ops.field_mse(upsample_field(x, factor) + 0.0, upsample_field(y, factor))  # noqa: E731
    both = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    assert "crd_grad_l2_coarse" in both(coarse).lower(a, b).as_text()
    assert "crd_grad_l2_coarse" not in both(fine).lower(a, b).as_text()  # one of them is not upsample_field's own
    (v1, g1), (v0, g0) = both(coarse)(a, b), both(fine)(a, b)
    want = np.mean((_fine_upsampled_numpy(np.asarray(a), factor) - _fine_upsampled_numpy(np.asarray(b), factor)) ** 2)
    np.testing.assert_allclose(float(v1), want, rtol=2e-6)
    np.testing.assert_allclose(float(v0), want, rtol=2e-6)
    for x, y in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6 * float(jnp.max(jnp.abs(y))))
    z_native, z_xla = grad_l2_ops._native_z(a, factor, "gram"), grad_l2_ops._upsampled_z_xla(a, factor, "gram")
    np.testing.assert_allclose(np.asarray(z_native), np.asarray(z_xla), atol=1e-6 * float(jnp.max(jnp.abs(z_xla))))


def test_field_mse_keeps_the_fine_grid_where_the_coarse_form_does_not_apply():
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.standard_normal((1, 4, 4, 4, 3)).astype(np.float32)) for _ in range(2))

    def text(f):  # a new function each time: the settings are read when a function is traced
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(a, b).as_text()

    up = upsample_field
    assert "crd_grad_l2_coarse" not in text(lambda x, y: grad_l2_ops.field_mse(up(x, 2), up(y[:, ::2, ::2, ::2], 4)))
    assert "crd_grad_l2_coarse" not in text(lambda x, y: grad_l2_ops.field_mse(up(x, 2), up(y, 2) * 1.0))
    np.testing.assert_allclose(  # a fine-grid field against an upsampled one: the plain mean
        float(grad_l2_ops.field_mse(up(a, 2), up(b, 2) * 1.0)), float(jnp.mean((up(a, 2) - up(b, 2)) ** 2)), rtol=1e-6
    )
    before = grad_l2_ops.mse_coarse()
    try:
        grad_l2_ops.mse_coarse(False)
        assert "crd_grad_l2_coarse" not in text(lambda x, y: grad_l2_ops.field_mse(up(x, 2), up(y, 2)))
    finally:
        grad_l2_ops.mse_coarse(before)
    with pytest.raises(ValueError, match="shapes differ"):
        grad_l2_ops.mse_of_upsampled(a, b[:, :2], 2)


def test_the_coarse_grad_l2_under_vmap_and_where_it_does_not_apply():
    phi = jax.random.normal(jax.random.PRNGKey(2), (3, 1, 4, 5, 3, 3))
    got = jax.vmap(lambda x: grad_l2_ops.grad_l2(upsample_field(x, 2)))(phi)
    want = jax.vmap(lambda x: grad_l2_ops.grad_l2_reference(upsample_field(x, 2)))(phi)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    before = (grad_l2_ops.grad_l2_formulation(), grad_l2_ops.grad_l2_coarse())

    def lowered():  # a new function each time: the settings are read when a function is traced
        return jax.jit(jax.value_and_grad(lambda x: grad_l2_ops.grad_l2(upsample_field(x, 2)))).lower(phi[0]).as_text()

    try:
        grad_l2_ops.grad_l2_coarse(False)  # switched off: the fine-grid kernel
        text = lowered()
        assert "crd_grad_l2_fwd" in text and "crd_grad_l2_coarse" not in text
        grad_l2_ops.grad_l2_coarse(True)
        grad_l2_ops.grad_l2_formulation("xla")  # forward-mode autodiff needs the reference: no custom VJP at all
        assert "crd_grad_l2" not in lowered()
    finally:
        grad_l2_ops.grad_l2_formulation(before[0])
        grad_l2_ops.grad_l2_coarse(before[1])


def test_the_coarse_grad_l2_keeps_precision_under_a_large_offset_and_has_second_derivatives():
    # a smooth field of small gradient on a large constant part: the quadratic form would cancel in float32
    grid = np.meshgrid(*(np.linspace(0, np.pi, 12) for _ in range(3)), indexing="ij")
    smooth = np.stack([np.sin(g) for g in grid], -1)[None].astype(np.float32)
    for offset, amplitude in ((50.0, 0.0), (20.0, 0.01), (5.0, 0.05), (0.0, 3.0)):
        phi = offset + amplitude * smooth
        got = float(grad_l2_ops.grad_l2(upsample_field(jnp.asarray(phi), 2)))
        want = _fine_grad_l2_numpy(phi, 2)
        assert got >= 0.0 and abs(got - want) <= 1e-5 * want + 1e-12, (offset, amplitude, got, want)
    # gradients of gradients (reverse over reverse), as the fine-grid term has them
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 3, 4, 3, 3)).astype(np.float32))
    outer = lambda f: jax.grad(lambda y: jnp.sum(jax.grad(f)(y) ** 2))(x)  # noqa: E731
    coarse = outer(lambda y: grad_l2_ops.grad_l2(upsample_field(y, 2)))
    fine = outer(lambda y: grad_l2_ops.grad_l2_reference(upsample_field(y, 2) + 0.0))
    np.testing.assert_allclose(np.asarray(coarse), np.asarray(fine), atol=1e-5 * float(jnp.max(jnp.abs(fine))))


def test_only_upsample_fields_own_unchangeable_result_is_recognised():
    from crd_jax.ops import spatial

    phi = jnp.ones((1, 3, 4, 5, 3))
    assert spatial.upsampled_from(spatial.upsample_field(phi, 2))[1] == 2
    assert spatial.upsampled_from(spatial.upsample_field(phi, 2) * 1.0) is None  # equal, but another array
    source = np.ones((1, 3, 4, 5, 3), np.float32)  # numpy: it could change in place after the upsampling
    assert spatial.upsampled_from(spatial.upsample_field(source, 2)) is None
    assert spatial.upsampled_from(spatial.upsample_field(phi, 2.5)) is None  # not a whole factor
    kept = jnp.asarray(np.arange(180, dtype=np.float32).reshape(1, 3, 4, 5, 3))
    v = spatial.upsample_field(kept, 2)
    kept.delete()  # deleted (or donated) since: the fine grid, not an error
    assert spatial.upsampled_from(v) is None and np.isfinite(float(grad_l2_ops.grad_l2(v)))


def test_a_low_resolution_models_loss_takes_its_smoothness_on_the_coarse_grid_with_the_same_gradient():
    from crd_jax.interop import official
    from crd_jax.models.build import model_from_spec
    from crd_jax.training import baseline

    arch = official.ARCHITECTURE | {"fusion": "paper", "teacher_align_corners": False}
    model = model_from_spec({"kind": "registrar", "factor": 2, "architecture": arch})
    rng = np.random.default_rng(5)
    batch = {k: jnp.asarray(rng.random((1, 32, 32, 32, 1)).astype(np.float32)) for k in ("moving", "fixed")}
    params = model.init(jax.random.PRNGKey(0), batch["moving"], batch["fixed"])
    loss = baseline.make_loss(model)
    step = jax.jit(jax.value_and_grad(lambda p: loss(p, None, batch)[0]))
    assert "crd_grad_l2_coarse" in step.lower(params).as_text()
    v1, g1 = step(params)
    before = grad_l2_ops.grad_l2_coarse()
    try:
        grad_l2_ops.grad_l2_coarse(False)
        v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, None, batch)[0]))(params)
    finally:
        grad_l2_ops.grad_l2_coarse(before)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(np.max(np.abs(b))) + 1e-9)


@pytest.mark.parametrize(
    "oshape,ishape,scale",
    [
        ((1, 6, 7, 37), (6, 7, 37), 2.0),
        ((2, 5, 4, 19), (9, 7, 30), 6.0),
        ((1, 3, 4, 8), (2, 1, 5), 1.0),
        ((1, 3, 4, 16), (3, 4, 2), 3.0),  # input rows of two voxels
        ((1, 2, 3, 9), (2, 3, 1), 2.0),  # rows of one voxel: both corners along them clamp to it
    ],
)
def test_one_pass_warp_equals_the_two_pass_warp_exactly(oshape, ishape, scale):
    """warp_linear_cpu.cc (eight voxels at a time with AVX2 gathers, the rest scalar) against warp_cpu.cc +
    warp_grad_cpu.cc: the same float operations in the same order, so equal bits, NaN coordinates and coordinates
    beyond both edges included."""
    from crd_jax.ops import spatial

    rng = np.random.default_rng(sum(oshape))
    image = jnp.asarray(rng.random((oshape[0], *ishape, 1), np.float32))
    disp = jnp.asarray((rng.standard_normal((*oshape, 3)) * scale).astype(np.float32))
    disp = disp.at[0, 0, 0, 2].set(jnp.asarray([np.nan, 0.0, 0.0], np.float32))
    disp = disp.at[0, -1, -1, 0].set(jnp.asarray([-50.0, 70.0, 0.5], np.float32))
    g = jnp.asarray(rng.standard_normal((*oshape, 1)).astype(np.float32))
    before = spatial.warp_gradient()
    out = {}
    try:
        for mode in ("regather", "native"):
            spatial.warp_gradient(mode)
            y, vjp = jax.vjp(lambda d: spatial.warp(image, d), disp)
            out[mode] = (y, vjp(g)[0])
    finally:
        spatial.warp_gradient(before)
    for a, b in zip(out["native"], out["regather"]):
        assert bool(jnp.array_equal(a, b, equal_nan=True))


def test_native_losses_under_vmap_match_the_references():
    """A batch of pairs mapped with jax.vmap (each call of the kernels runs once per pair)."""
    f, m = _pair((3, 1, 6, 40, 9, 1), 13)
    ncc_got = jax.vmap(jax.value_and_grad(lambda m, f: ncc_ops.ncc(f, m, 5)))(m, f)
    ncc_want = jax.vmap(jax.value_and_grad(lambda m, f: ncc_ops.ncc_reference(f, m, 5)))(m, f)
    np.testing.assert_allclose(np.asarray(ncc_got[0]), np.asarray(ncc_want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ncc_got[1]), np.asarray(ncc_want[1]), atol=2e-5 * float(jnp.max(jnp.abs(ncc_want[1]))))
    disp = jnp.asarray(np.random.default_rng(2).standard_normal((3, 1, 5, 6, 7, 3)).astype(np.float32))
    l2_got = jax.vmap(jax.value_and_grad(grad_l2_ops.grad_l2))(disp)
    l2_want = jax.vmap(jax.value_and_grad(grad_l2_ops.grad_l2_reference))(disp)
    np.testing.assert_allclose(np.asarray(l2_got[0]), np.asarray(l2_want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(l2_got[1]), np.asarray(l2_want[1]), atol=2e-6 * float(jnp.max(jnp.abs(l2_want[1]))))


def test_empty_inputs_and_a_traced_eps_take_the_reference():
    """An empty image or field gives the reference's NaN (no division by a zero size in the wrapper), and an
    ``eps`` that is a tracer (the kernel takes it as a constant) runs the reference inside the same jit."""
    empty = jnp.zeros((1, 0, 4, 4, 1), jnp.float32)
    assert np.isnan(float(losses.ncc(empty, empty))) and np.isnan(float(ncc_ops.ncc_reference(empty, empty)))
    field = jnp.zeros((1, 0, 4, 4, 3), jnp.float32)
    assert np.isnan(float(grad_l2_ops.grad_l2(field))) and np.isnan(float(grad_l2_ops.grad_l2_reference(field)))
    f, m = _pair((1, 6, 7, 8, 1), 3)
    traced = jax.jit(lambda e: ncc_ops.ncc(f, m, 5, e))(1e-5)
    np.testing.assert_allclose(float(traced), float(ncc_ops.ncc_reference(f, m, 5, 1e-5)), rtol=1e-6)


def test_formulations_report_what_runs_when_the_native_kernels_are_switched_off():
    # "native" is the default wish; without the kernels the reference runs, and the getters say so (results files
    # and the stored-program key record them)
    import subprocess
    import sys

    code = (
        "from crd_jax.ops import grad_l2, native, ncc, spatial\n"
        "print(native.available(), spatial.upsample_vjp(), spatial.warp_gradient(), ncc.ncc_formulation(),"
        " grad_l2.grad_l2_formulation())"
    )
    env = dict(os.environ, CRD_JAX_FAST_CONV="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "stencil", "xla", "xla", "xla"]
