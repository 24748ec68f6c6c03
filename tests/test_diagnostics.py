"""Distillation diagnostics (crd_jax/training/diagnostics.py) against numpy and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax.training import diagnostics as diag


@pytest.mark.parametrize("shape,factor", [((8, 12, 4), 2), ((8, 8), 4), ((6, 9, 3), 3)])
def test_block_mean_field_is_the_block_average_in_coarse_voxels(shape, factor):
    rng = np.random.default_rng(0)
    d = rng.normal(size=(2, *shape, len(shape))).astype(np.float32)
    got = np.asarray(diag.block_mean_field(jnp.asarray(d), factor))
    want = np.zeros((2, *(s // factor for s in shape), len(shape)))
    for idx in np.ndindex(*(s // factor for s in shape)):
        sl = tuple(slice(i * factor, (i + 1) * factor) for i in idx)
        want[(slice(None), *idx)] = d[(slice(None), *sl)].mean(axis=tuple(range(1, 1 + len(shape)))) / factor
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        diag.block_mean_field(jnp.zeros((1, 5, 4, 2)), 2)


def test_ceiling_of_a_linear_field_is_the_field_itself_away_from_the_border():
    # a linear displacement is reproduced exactly by block means (its value at block centres) followed by
    # linear up-sampling with half-pixel centres, except in the outer half block where resize clamps
    n, shape = 2, (16, 12, 8)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    disp = (0.1 * grid[..., ::-1] + np.array([0.5, -1.0, 2.0], np.float32))[None]
    predict = diag.ceiling_predictor(lambda p, m, f: jnp.asarray(disp), n)
    got = np.asarray(predict(None, None, None))
    inner = (slice(None),) + tuple(slice(n, s - n) for s in shape)
    np.testing.assert_allclose(got[inner], disp[inner], atol=1e-4)


def test_headroom_pairs_are_fixed_distinct_ordered_training_pairs():
    a, b = diag.headroom_pairs(24), diag.headroom_pairs(24)
    assert a == b and len(a) == 16 and len(set(a)) == 16
    assert all(m != f and 0 <= m < 24 and 0 <= f < 24 for m, f in a)
    assert len(diag.headroom_pairs(3)) == 6 and diag.headroom_pairs(1) == []


def test_term_gradient_norms_match_the_analytic_gradient():
    # loss terms a = sum(p^2) and b = sum(3 p): gradients 2p and 3, norms |2p| and 3 sqrt(size)
    params = {"w": jnp.asarray([1.0, -2.0, 2.0])}

    def loss_fn(p, frozen, batch):
        a = jnp.sum(p["w"] ** 2) * batch["scale"].mean()
        b = jnp.sum(3 * p["w"])
        return a + b, {"a": a, "b": b}

    out = diag.term_gradient_norms(
        loss_fn, params, None, [{"scale": np.ones(1)}, {"scale": 3 * np.ones(1)}], {"a": 0.5, "b": 2.0}
    )
    np.testing.assert_allclose(out["a"]["grad_norm"], (6.0 + 18.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(out["b"]["grad_norm"], 3 * np.sqrt(3), rtol=1e-6)
    assert out["b"]["weighted_grad_norm"] == pytest.approx(2.0 * 3 * np.sqrt(3))
