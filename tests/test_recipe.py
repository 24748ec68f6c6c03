"""The training-recipe options of issue 11: flow-head initialisation, gradient clipping, the compact FST
head, and eq. 8 at full resolution."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from crd_jax import losses
from crd_jax.compile import run_once
from crd_jax.config import base_config
from crd_jax.models import build
from crd_jax.models.layers import redraw_flow_heads
from crd_jax.ops.spatial import upsample_field
from crd_jax.training import distill
from crd_jax.training.loop import make_optimizer


def _arch(**fields):
    cfg = base_config().model.to_dict()
    cfg.update(fields)
    return build.architecture(cfg)


def _pair(shape=(16, 16, 16)):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return jax.random.uniform(k1, (1, *shape, 1)), jax.random.uniform(k2, (1, *shape, 1))


@pytest.mark.slow
def test_redraw_flow_heads_torch_bounds_and_other_params_untouched():
    model = build.registrar_from_config(_arch(), 2)
    m, f = _pair()
    params = model.init(jax.random.PRNGKey(0), m, f)
    new = redraw_flow_heads(params, jax.random.PRNGKey(1), "torch")
    kernel, bias = np.asarray(new["flow"]["conv"]["kernel"]), np.asarray(new["flow"]["conv"]["bias"])
    bound = 1.0 / np.sqrt(27 * 16)  # fan_in of a 3^3 conv from 16 channels
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    # a uniform draw on [-b, b] has standard deviation b / sqrt(3); the old head had 1e-5
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert np.abs(bias).max() > 0
    for a, b in zip(jax.tree_util.tree_leaves(params["unet"]), jax.tree_util.tree_leaves(new["unet"])):
        np.testing.assert_array_equal(a, b)
    same = redraw_flow_heads(params, jax.random.PRNGKey(1), "small")
    np.testing.assert_array_equal(same["flow"]["conv"]["kernel"], params["flow"]["conv"]["kernel"])
    with pytest.raises(ValueError, match="flow_init"):
        redraw_flow_heads(params, jax.random.PRNGKey(1), "zeros")


@pytest.mark.slow
def test_redraw_reaches_every_pyramid_level():
    model = build.registrar_from_config(
        _arch(backbone="pyramid", encoder=(8, 8, 8, 8, 8), encoder_strides=(1, 2, 2, 2, 2), estimator=(8,)), 1
    )
    m, f = _pair()
    params = model.init(jax.random.PRNGKey(0), m, f)
    new = redraw_flow_heads(params, jax.random.PRNGKey(1))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(new)]
    flow_kernels = [p for p in paths if "flow_" in p and p.endswith("['kernel']")]
    assert len(flow_kernels) >= 4
    for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(new)):
        changed = not np.array_equal(a, b)
        assert changed == ("flow_" in jax.tree_util.keystr(p)), jax.tree_util.keystr(p)


def test_grad_clip_equals_manual_clip_then_adam():
    tc = ml_collections.ConfigDict(
        {"lr": 0.1, "b1": 0.9, "b2": 0.99, "lr_decay_at": (), "lr_decay_factor": 0.5, "grad_clip": 1.0}
    )
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.asarray([30.0, -40.0, 0.0, 0.0])}  # global norm 50
    opt = make_optimizer(tc, 10)
    updates, _ = opt.update(grads, opt.init(params), params)
    scaled = {"w": grads["w"] / 50.0}
    adam = optax.adam(0.1, b1=0.9, b2=0.99)
    want, _ = adam.update(scaled, adam.init(params), params)
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
    # and the clipped gradient differs from Adam on raw gradients only by eps effects: check the second step
    updates2, _ = opt.update(grads, opt.update(grads, opt.init(params), params)[1], params)
    assert np.all(np.isfinite(updates2["w"]))


@pytest.mark.slow
def test_compact_fusion_has_one_conv_per_level_and_fewer_parameters():
    m, f = _pair((32, 32, 32))
    sizes = {}
    for fusion in ("paper", "compact"):
        teacher = build.teacher_from_config(_arch(fusion=fusion), 2)
        bp = run_once(lambda k, a, b: teacher.backbone.init(k, a, b)["params"], jax.random.PRNGKey(0), m, f)
        head = teacher.init_head(jax.random.PRNGKey(1), bp, m, f)
        sizes[fusion] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(head))
        convs = {k: sorted(v) for k, v in head.items() if k.startswith("fuse_")}
        assert all(c == (["conv_0", "conv_1", "conv_2", "conv_3"] if fusion == "paper" else ["conv_3"]) for c in convs.values())
    # 4 convs of (a+b)->(a+b) / (a+b)->b vs one (a+b)->b per level: the paper's head is much larger
    assert sizes["compact"] < 0.5 * sizes["paper"]


def test_deformation_loss_full_grid_is_mse_of_upsampled_fields():
    rng = np.random.default_rng(0)
    low_t, low_s = (jnp.asarray(rng.normal(size=(1, 4, 4, 4, 3)), jnp.float32) for _ in range(2))
    t = {"disp_low": low_t, "disp": upsample_field(low_t, 2)}
    s = {"disp_low": low_s, "disp": upsample_field(low_s, 2)}
    student = float(distill.deformation_loss(t, s, "student"))
    full = float(distill.deformation_loss(t, s, "full"))
    np.testing.assert_allclose(student, np.mean((np.asarray(low_t) - np.asarray(low_s)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(full, float(losses.mse(t["disp"], s["disp"])), rtol=1e-6)
    # up(.) multiplies displacements by n = 2: for constant fields the full-resolution term is exactly n^2 = 4x
    ct, cs = jnp.full((1, 4, 4, 4, 3), 0.5), jnp.full((1, 4, 4, 4, 3), -0.25)
    t, s = {"disp_low": ct, "disp": upsample_field(ct, 2)}, {"disp_low": cs, "disp": upsample_field(cs, 2)}
    np.testing.assert_allclose(float(distill.deformation_loss(t, s, "full")), 4 * 0.75**2, rtol=1e-6)
    np.testing.assert_allclose(float(distill.deformation_loss(t, s, "student")), 0.75**2, rtol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        distill.deformation_loss(t, s, "half")
