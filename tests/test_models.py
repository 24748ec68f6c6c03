"""Model output shapes, feature levels and gradient flow, 2-D and 3-D."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax import losses
from crd_jax.compile import run_once
from crd_jax.models import Registrar, VoxelMorph
from crd_jax.ops import spatial


def _pair(shape, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.uniform(k1, (1, *shape, 1)), jax.random.uniform(k2, (1, *shape, 1))


def _init(model, *pair):
    return run_once(lambda k, m, f: model.init(k, m, f)["params"], jax.random.PRNGKey(0), *pair)


def _n_params(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_voxelmorph_output_and_feature_levels(shape):
    model = VoxelMorph()
    moving, fixed = _pair(shape)
    params = _init(model, moving, fixed)
    out = jax.jit(model.apply)({"params": params}, moving, fixed)
    assert out["disp"].shape == (1, *shape, len(shape))
    feats = out["features"]
    assert sorted(feats) == [0, 1, 2, 3, 4]
    for level, channels in zip(range(5), [16, 32, 32, 32, 32]):
        assert feats[level].shape == (1, *(s // 2**level for s in shape), channels)
    # The flow head starts near zero, so an untrained model is close to the identity.
    assert float(jnp.max(jnp.abs(out["disp"]))) < 1e-2


def test_voxelmorph_parameter_count_matches_voxelmorph2():
    """VoxelMorph-2 3-D (enc 16,32,32,32; dec 32,32,32,32,32,16,16), counted layer by layer (paper: 0.3M)."""
    params = jax.eval_shape(lambda: VoxelMorph().init(jax.random.PRNGKey(0), *_pair((16, 16, 16)))["params"])
    enc = [(2, 16), (16, 32), (32, 32), (32, 32)]
    dec = [(32, 32), (64, 32), (64, 32), (48, 32), (32, 32), (34, 16), (16, 16), (16, 3)]
    expected = sum(27 * i * o + o for i, o in enc + dec)
    assert _n_params(params) == expected == 300547


def test_channel_lists_make_light_and_large_variants():
    light = VoxelMorph(encoder=(8, 16, 16, 16), decoder=((16,), (16,), (16,), (16, 4), (4,)))
    large = VoxelMorph(encoder=(32, 64, 64, 64), decoder=((64,), (64,), (64,), (64, 64), (32, 32)))
    pair = _pair((16, 16, 16))
    n_light = _n_params(jax.eval_shape(lambda: light.init(jax.random.PRNGKey(0), *pair)["params"]))
    n_large = _n_params(jax.eval_shape(lambda: large.init(jax.random.PRNGKey(0), *pair)["params"]))
    assert n_light < 300547 / 3 and n_large > 3.5 * 300547


def test_diffeomorphic_variant_integrates_the_velocity():
    model = VoxelMorph(diffeomorphic=True, int_steps=7)
    moving, fixed = _pair((16, 16))
    params = _init(model, moving, fixed)
    params["flow"]["conv"]["bias"] = jnp.asarray([0.5, -0.25])  # a constant velocity
    out = jax.jit(model.apply)({"params": params}, moving, fixed)
    np.testing.assert_allclose(out["disp"], spatial.integrate_velocity(out["velocity"], 7), atol=1e-6)
    # integrating a (nearly) constant velocity gives that constant displacement inside the volume
    np.testing.assert_allclose(out["disp"][0, 4:-4, 4:-4], np.broadcast_to([0.5, -0.25], (8, 8, 2)), atol=2e-2)


@pytest.mark.parametrize("factor", [2, 4])
def test_low_resolution_registrar_shapes(factor):
    shape = (64, 64)
    model = Registrar(VoxelMorph(), factor=factor)
    moving, fixed = _pair(shape)
    params = model.init(jax.random.PRNGKey(0), moving, fixed)
    out = jax.jit(model.apply)(params, moving, fixed)
    low = tuple(s // factor for s in shape)
    assert out["disp"].shape == (1, *shape, 2)
    assert out["disp_low"].shape == (1, *low, 2)
    assert out["features"][0].shape[1:-1] == low
    np.testing.assert_allclose(out["disp"], spatial.upsample_field(out["disp_low"], factor), atol=1e-6)
    assert model.shift == {2: 1, 4: 2}[factor]
    # Same parameter tree as the full-resolution model (one set of weights serves both, eq. 4-6).
    full = Registrar(VoxelMorph(), factor=1).init(jax.random.PRNGKey(0), moving, fixed)
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(params)


def test_registrar_rejects_indivisible_size_and_bad_factor():
    with pytest.raises(ValueError):
        Registrar(VoxelMorph(), factor=3)
    with pytest.raises(ValueError):
        Registrar(VoxelMorph(), factor=2).init(jax.random.PRNGKey(0), *_pair((33, 32)))


@pytest.mark.parametrize("shape,diff", [((32, 32), False), ((16, 16, 16), False), ((32, 32), True)])
def test_gradients_reach_every_parameter(shape, diff):
    model = Registrar(VoxelMorph(diffeomorphic=diff), factor=1)
    moving, fixed = _pair(shape, seed=1)
    params = model.init(jax.random.PRNGKey(0), moving, fixed)

    def loss(p):
        out = model.apply(p, moving, fixed)
        return losses.ncc(fixed, spatial.warp(moving, out["disp"])) + losses.grad_l2(out["disp"])

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), path


def test_model_output_is_a_typed_pytree_with_the_old_mapping_view():
    from crd_jax.models.output import ModelOutput, as_output

    out = ModelOutput(disp=jnp.ones((1, 4, 4, 2)), features={0: jnp.zeros((1, 4, 4, 3))})
    leaves = jax.tree_util.tree_leaves(out)
    assert len(leaves) == 2  # disp and one feature level; the None fields are empty subtrees
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, out)
    assert isinstance(doubled, ModelOutput) and float(doubled.disp.sum()) == 64.0  # 32 ones, doubled
    assert "disp" in out and "fields" not in out and out["features"][0].shape == (1, 4, 4, 3)
    with pytest.raises(KeyError):
        out["velocity"]
    legacy = as_output({"disp": out.disp, "matrix": jnp.eye(2)})
    assert legacy.extras["matrix"].shape == (2, 2) and legacy["matrix"].shape == (2, 2)
    assert jax.jit(lambda o: o.replace(disp_low=o.disp[:, ::2, ::2]))(out).disp_low.shape == (1, 2, 2, 2)


@pytest.mark.parametrize("shapes", [[(1, 5, 6, 7, 1)] * 2, [(2, 4, 5, 1)] * 3, [(1, 4, 5, 6, 1), (1, 4, 5, 6, 3)]])
def test_channel_concat_equals_numpy_in_values_and_gradients(shapes):
    """The image pair is interleaved by a select (faster on XLA:CPU than its concatenate); other parts take
    jnp.concatenate: both equal numpy's concatenation, and the gradient splits back to each part."""
    from crd_jax.models.layers import concat

    rng = np.random.default_rng(len(shapes))
    parts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    np.testing.assert_array_equal(jax.jit(concat)(parts), np.concatenate(parts, axis=-1))
    weights = rng.standard_normal(np.concatenate(parts, axis=-1).shape).astype(np.float32)
    grads = jax.grad(lambda ps: jnp.sum(concat(ps) * weights))(parts)
    for g, piece in zip(grads, np.split(weights, np.cumsum([s[-1] for s in shapes])[:-1], axis=-1)):
        np.testing.assert_array_equal(g, piece)
