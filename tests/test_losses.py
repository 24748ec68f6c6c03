"""Losses against brute-force numpy and closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

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


# --- multi-modal similarities ----------------------------------------------------------------------------------


def _mind_numpy(img, radius=1):
    """MIND-SSC by the definition, in numpy/scipy (independent of the JAX code)."""
    from scipy import ndimage as ndi

    six = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    pairs = [(p, q) for i, p in enumerate(six) for q in six[i + 1 :] if sum((a - b) ** 2 for a, b in zip(p, q)) == 2]
    padded = np.pad(img.astype(np.float64), 1, mode="edge")
    n = img.shape

    def shifted(o):
        return padded[1 + o[0] : 1 + o[0] + n[0], 1 + o[1] : 1 + o[1] + n[1], 1 + o[2] : 1 + o[2] + n[2]]

    w = 2 * radius + 1
    d = np.stack([ndi.uniform_filter((shifted(p) - shifted(q)) ** 2, size=w, mode="constant") for p, q in pairs], -1)
    v = d.mean(-1, keepdims=True)
    v = np.clip(v, v.mean() * 1e-3, v.mean() * 1e3) + 1e-6
    m = np.exp(-d / v)
    return m / m.max(-1, keepdims=True)


def test_mind_ssc_matches_a_numpy_reference_and_ignores_affine_intensity_changes():
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.random((10, 9, 8)), 1.0)
    got = np.asarray(losses.mind_ssc(jnp.asarray(img, jnp.float32)[None, ..., None]))[0]
    np.testing.assert_allclose(got, _mind_numpy(img), atol=2e-5)
    x = jnp.asarray(img, jnp.float32)[None, ..., None]
    assert float(losses.mind_loss(x, 2.0 - 3.0 * x)) < 1e-6  # contrast inversion and scaling: same structure
    assert float(losses.mind_loss(x, jnp.roll(x, 2, axis=1))) > 1e-3


def _nmi_numpy(a, b, bins=32):
    centres = np.linspace(0, 1, bins)
    width = 0.5 / (bins - 1)

    def votes(x):
        w = np.exp(-0.5 * ((np.clip(x.ravel(), 0, 1)[:, None] - centres) / width) ** 2)
        return w / (w.sum(1, keepdims=True) + 1e-10)

    joint = votes(a).T @ votes(b) / a.size
    h = lambda p: -np.sum(p * np.log(p + 1e-10))  # noqa: E731
    return -(h(joint.sum(1)) + h(joint.sum(0))) / h(joint)


def test_nmi_matches_a_numpy_reference_and_is_best_for_related_images():
    rng = np.random.default_rng(1)
    a = ndimage.gaussian_filter(rng.random((12, 10, 8)), 1.0)
    a = (a - a.min()) / np.ptp(a)
    b = rng.random(a.shape)
    x = lambda v: jnp.asarray(v, jnp.float32)[None, ..., None]  # noqa: E731
    np.testing.assert_allclose(float(losses.nmi(x(a), x(b))), _nmi_numpy(a, b), rtol=1e-4)
    assert float(losses.nmi(x(a), x(1 - a))) == pytest.approx(float(losses.nmi(x(a), x(a))), rel=1e-5)  # any monotone map
    assert float(losses.nmi(x(a), x(a))) < float(losses.nmi(x(a), x(b))) - 0.2
    with pytest.raises(ValueError, match="unknown similarity"):
        losses.similarity("ssd")


@pytest.mark.parametrize("name", ["mind", "nmi"])
@pytest.mark.slow
def test_every_stage_of_the_scheme_can_train_with_another_similarity(name):
    from crd_jax.config import base_config
    from crd_jax.training.stages import Trained, plan_stage

    c = base_config()
    c.loss.similarity = name
    rng = np.random.default_rng(2)
    batch = {
        k: jnp.asarray(ndimage.gaussian_filter(rng.random((1, 32, 32, 32, 1)), (0, 2, 2, 2, 0)), jnp.float32)
        for k in ("moving", "fixed")
    }
    done = {}
    for i, stage in enumerate(c.pipeline):
        plan = plan_stage(stage, c.stages[stage], c, done, jax.random.PRNGKey(i), batch)
        loss, aux = jax.jit(plan.loss_fn)(plan.init_params, plan.frozen, batch)
        assert np.isfinite(float(loss)), stage
        done[stage] = Trained(plan.model, plan.full_params(plan.init_params), plan.spec)
    assert "sim" in aux


def _soft_dice_numpy(a, b, eps=1e-6):
    axes = tuple(range(1, a.ndim - 1))
    return np.mean((2 * (a * b).sum(axes) + eps) / (a.sum(axes) + b.sum(axes) + eps))


def test_label_dice_loss_matches_scipy_warp_of_one_hot_maps():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    shape, k = (9, 10, 8), 3
    moving = rng.integers(0, k + 1, (1,) + shape).astype(np.int32)
    fixed = rng.integers(0, k + 1, (1,) + shape).astype(np.int32)
    disp = rng.normal(0, 0.8, (1,) + shape + (3,)).astype(np.float32)
    ours = float(losses.label_dice_loss(jnp.asarray(moving), jnp.asarray(fixed), jnp.asarray(disp), k))
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    coords = [g + disp[0, ..., a] for a, g in enumerate(grid)]
    warped = np.stack(
        [ndimage.map_coordinates((moving[0] == c).astype(np.float64), coords, order=1, mode="nearest") for c in range(1, k + 1)],
        -1,
    )[None]
    onehot_fixed = np.stack([(fixed[0] == c) for c in range(1, k + 1)], -1)[None].astype(np.float64)
    assert ours == pytest.approx(1 - _soft_dice_numpy(onehot_fixed, warped), abs=1e-5)
    # identical maps and no motion: a perfect overlap, and background does not count
    same = float(losses.label_dice_loss(jnp.asarray(fixed), jnp.asarray(fixed), jnp.zeros_like(jnp.asarray(disp)), k))
    assert same == pytest.approx(0.0, abs=1e-6)


def test_objective_adds_the_weighted_label_term_and_its_gradient_moves_the_field():
    rng = np.random.default_rng(4)
    shape = (12, 12, 12)
    img = jnp.asarray(rng.random((1,) + shape + (1,)), jnp.float32)
    labels = np.zeros((1,) + shape, np.int32)
    labels[0, 3:8, 3:8, 3:8] = 1
    shifted = np.roll(labels, 2, axis=1)
    batch = {"moving": img, "fixed": img, "moving_labels": jnp.asarray(labels), "fixed_labels": jnp.asarray(shifted)}
    disp = jnp.zeros((1,) + shape + (3,), jnp.float32)
    plain, _ = losses.Objective()(batch, disp)
    with_labels, terms = losses.Objective(label_weight=0.5, num_labels=1)(batch, disp)
    assert float(with_labels) == pytest.approx(float(plain) + 0.5 * float(terms["dice_loss"]), abs=1e-6)
    # the gradient of the label term points the field toward the fixed structure (a shift of -2 along axis 0)
    term = lambda d: losses.label_dice_loss(batch["moving_labels"], batch["fixed_labels"], d, 1)  # noqa: E731
    g = jax.grad(term)(disp)
    assert float(g[0, 3:10, 3:8, 3:8, 0].sum()) > 0
    assert float(term(disp - 20.0 * g)) < float(term(disp))


def test_the_built_in_similarities_are_registry_entries_equal_to_their_functions():
    """``similarity(name)`` builds the registered class; each built-in returns exactly its function's value."""
    rng = np.random.default_rng(5)
    f, w = (jnp.asarray(ndimage.gaussian_filter(rng.random((1, 12, 10, 8, 1)), (0, 1, 1, 1, 0)), jnp.float32) for _ in range(2))
    assert {"ncc", "mind", "nmi"} <= set(losses.SIMILARITIES)
    assert float(losses.similarity("ncc", 5)(f, w)) == float(losses.ncc(f, w, window=5))
    assert float(losses.similarity("mind")(f, w)) == float(losses.mind_loss(f, w))
    assert float(losses.similarity("nmi")(f, w)) == float(losses.nmi(f, w))
    assert losses.similarity("ncc", 5) == losses.NCC(window=5)  # frozen: compares (and hashes) by value
    with pytest.raises(TypeError, match="Similarity subclass"):
        losses.register_similarity(lambda fixed, warped: 0.0)


def test_a_similarity_name_cannot_be_taken_over():
    import dataclasses
    from typing import ClassVar

    from crd_jax import losses

    @dataclasses.dataclass(frozen=True)
    class Impostor(losses.Similarity):
        name: ClassVar[str] = "ncc"

        def __call__(self, fixed, warped):
            return jnp.mean((fixed - warped) ** 2)

    with pytest.raises(ValueError, match="similarity 'ncc' is registered already"):
        losses.register_similarity(Impostor)
    assert losses.SIMILARITIES["ncc"] is losses.NCC
    assert losses.register_similarity(losses.NCC) is losses.NCC  # the same class again: fine
