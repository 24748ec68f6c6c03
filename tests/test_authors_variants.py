"""The authors' released code as options beside the paper's text (science issue, item 1): an FST predicting
at full resolution (``model.teacher_output``), attention-map distillation without L^L and with their weights
(``loss.feature_target``, ``loss.student_term``, per-stage ``loss`` overrides), a student initialised from S1.

Small VM-lighter models on 32^3 / 64^3 canvases keep this quick; numbers are checked against independent
computations (numpy block means, hand-written eq. 8-10)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crd_jax import losses
from crd_jax.config import VM_LIGHTER, base_config, stage
from crd_jax.models import build as mbuild
from crd_jax.training import distill
from crd_jax.training.stages import Trained, plan_stage, stage_loss_config


def _config(shift=1, **model):
    c = base_config()
    for k, v in {**VM_LIGHTER, "fusion": "compact", "shift": shift, **model}.items():
        c.model[k] = v
    return c


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.random((1, *shape, 1)).astype(np.float32)
    smooth = jnp.asarray(base)
    for axis in range(1, 1 + len(shape)):  # a little smoothing so that NCC has structure to align
        smooth = (smooth + jnp.roll(smooth, 1, axis) + jnp.roll(smooth, -1, axis)) / 3
    return {"moving": smooth, "fixed": jnp.roll(smooth, 2, axis=1)}


def _teacher(config, shape, shift, output):
    arch = mbuild.architecture(dict(config.model.to_dict(), teacher_output=output))
    model = mbuild.teacher_from_config(arch, 2**shift)
    batch = _pair(shape)
    backbone = mbuild.registrar_from_config(arch, 1).init(jax.random.PRNGKey(0), batch["moving"], batch["fixed"])
    head = model.init_head(jax.random.PRNGKey(1), backbone, batch["moving"], batch["fixed"])
    return model, {"backbone": backbone, "head": head}, batch


@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.slow
def test_full_resolution_teacher_continues_through_the_finest_high_features(shift):
    shape = (64, 64, 64) if shift == 2 else (32, 32, 32)
    config = _config(shift)
    half, hp, batch = _teacher(config, shape, shift, "half")
    full, fp, _ = _teacher(config, shape, shift, "full")
    # the full head holds the half head's layers plus one conv per skipped level k-1..0
    extra = set(fp["head"]) - set(hp["head"])
    assert extra == {f"full_{lev}" for lev in range(shift)}
    assert set(hp["head"]) <= set(fp["head"])
    out_f = full.apply(fp, batch["moving"], batch["fixed"])
    out_h = half.apply(hp, batch["moving"], batch["fixed"])
    n = 2**shift
    assert out_f.disp.shape == out_h.disp.shape == (1, *shape, 3)
    assert out_f.disp_low.shape == out_h.disp_low.shape == (1, *(s // n for s in shape), 3)
    # the full head's field is not an upsampled coarse field: its voxels within one n^3 block differ
    d = np.asarray(out_f.disp[0])
    blocks = d.reshape(shape[0] // n, n, shape[1] // n, n, shape[2] // n, n, 3)
    assert np.abs(blocks - blocks.mean(axis=(1, 3, 5), keepdims=True)).max() > 0
    # the features distilled are the fused ones on the student's levels, the same for both outputs
    assert {l: v.shape for l, v in out_f.features.items()} == {l: v.shape for l, v in out_h.features.items()}
    # the full head's fused features equal the half head's for the same fusion parameters
    shared = dict(fp, head={k: v for k, v in fp["head"].items() if k in hp["head"]})
    out_h2 = half.apply(shared, batch["moving"], batch["fixed"])
    for l in out_f.features:
        np.testing.assert_array_equal(np.asarray(out_f.features[l]), np.asarray(out_h2.features[l]))


def test_fusion_head_reads_its_skips_through_the_fused_upsample_concat_op(monkeypatch):
    """Each decoder level's first conv (and the full head's finest one) reads concat(up(h), skip) as one fused op:
    the heads' fields, and the gradients of every head parameter (the fusion layers', where the skips' gradients
    land, included) of a loss on the field, equal those of the stored concatenation and a plain conv (the op
    swapped for that reference); the full head makes exactly one fused call more than the half head (its full_0)."""
    from crd_jax.models import layers
    from crd_jax.ops.conv import conv

    config = _config(1)
    real = layers.conv_upsampled_concat
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def stored(x, skip, w, b, negative_slope=None):
        up = layers.upsample_nearest(x, skip.shape[1:-1])
        return conv(layers.concat([up, skip]), w, b, negative_slope=negative_slope)

    counts = {}
    for output in ("half", "full"):
        model, params, batch = _teacher(config, (32, 32, 32), 1, output)
        shape = jax.eval_shape(lambda p: model.apply(p, batch["moving"], batch["fixed"]).disp, params).shape
        r = jax.random.normal(jax.random.PRNGKey(7), shape)

        def loss(p):  # the field alone (the distilled features are fused before the decoder: the op never sees them)
            disp = model.apply(p, batch["moving"], batch["fixed"]).disp
            return jnp.sum(disp * r), disp

        calls.clear()
        monkeypatch.setattr(layers, "conv_upsampled_concat", counting)
        (_, disp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)  # one trace: field and gradient
        counts[output] = len(calls)
        monkeypatch.setattr(layers, "conv_upsampled_concat", stored)
        (_, ref_disp), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        scale = float(np.abs(ref_disp).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(disp), np.asarray(ref_disp), rtol=1e-4, atol=1e-5 * scale)
        leaves, ref_leaves = jax.tree_util.tree_leaves_with_path(grads["head"]), jax.tree_util.tree_leaves(ref_grads["head"])
        assert any("fuse" in jax.tree_util.keystr(k) for k, _ in leaves)  # the skips' gradients land in the fusion
        for (key, g), ref in zip(leaves, ref_leaves):
            assert float(np.abs(ref).max()) > 0, key
            np.testing.assert_allclose(
                np.asarray(g), np.asarray(ref), rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()), err_msg=str(key)
            )
    assert counts["full"] == counts["half"] + 1 and counts["half"] > 0


def test_teacher_output_is_validated_and_pyramid_heads_refuse_full():
    arch = mbuild.architecture(dict(_config().model.to_dict(), teacher_output="quarter"))
    with pytest.raises(ValueError, match="teacher_output"):
        mbuild.teacher_from_config(arch, 2)
    c = base_config()
    c.model.backbone = "pyramid"
    for k, v in {"encoder": (4, 8, 8, 8, 8), "encoder_strides": (1, 2, 2, 2, 2), "estimator": (8, 4)}.items():
        c.model[k] = v
    arch = mbuild.architecture(dict(c.model.to_dict(), teacher_output="full"))
    with pytest.raises(ValueError, match="pyramid"):
        mbuild.teacher_from_config(arch, 2)


def _plan(config, name, block, done, batch):
    return plan_stage(name, block, config, done, jax.random.PRNGKey(3), batch)


def _stages(shift=1, output="full"):
    """A finished S1 (random weights) and an FST on it, as the pipeline would pass them on."""
    config = _config(shift, teacher_output=output)
    batch = _pair((32, 32, 32) if shift == 1 else (64, 64, 64))
    done = {}
    coop = _plan(config, "coop", stage("cooperative", steps=1), done, batch)
    done["coop"] = Trained(coop.model, coop.full_params(coop.init_params), coop.spec)
    fst = _plan(config, "fst", stage("teacher", backbone="coop", steps=1), done, batch)
    done["fst"] = Trained(fst.model, fst.full_params(fst.init_params), fst.spec)
    return config, batch, done, fst


@pytest.mark.slow
def test_full_fst_stage_trains_only_its_head_and_its_loss_decreases_on_a_fixed_pair():
    config, batch, done, fst = _stages(output="full")
    assert any(k.startswith("full_") for k in fst.init_params)
    loss = lambda p, frozen: fst.loss_fn(p, frozen, batch)[0]
    g_head, g_frozen = jax.grad(loss, argnums=(0, 1))(fst.init_params, fst.frozen)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g_frozen))
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g_head)) > 0
    opt = optax.adam(1e-3)
    params, state = fst.init_params, opt.init(fst.init_params)
    step = jax.jit(lambda p, s: _adam(loss, opt, p, s, fst.frozen))
    first = float(loss(params, fst.frozen))
    for _ in range(15):
        params, state = step(params, state)
    assert float(loss(params, fst.frozen)) < first


def _adam(loss, opt, params, state, frozen):
    grads = jax.grad(loss)(params, frozen)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


CODE_ARM = {"feature_target": "attention", "student_term": False, "alpha": 1.0, "beta": 1.0}


@pytest.mark.slow
def test_authors_s3_loss_is_field_mse_plus_attention_mse_without_the_student_term():
    config, batch, done, _ = _stages(output="full")
    config.loss.deformation_grid = "full"
    plan = _plan(config, "s3", stage("distill", teacher="fst", steps=1, init="coop", loss=CODE_ARM), done, batch)
    total, aux = plan.loss_fn(plan.init_params, plan.frozen, batch)
    # independent: the teacher's and student's outputs, eq. 8 on the full grid, attention maps sum_c F^2
    t = done["fst"].model.apply(done["fst"].params, batch["moving"], batch["fixed"])
    s = plan.model.apply(plan.init_params, batch["moving"], batch["fixed"])
    field = np.mean((np.asarray(t.disp) - np.asarray(s.disp)) ** 2)
    attention = sum(
        np.mean((np.sum(np.asarray(t.features[l]) ** 2, -1) - np.sum(np.asarray(s.features[l]) ** 2, -1)) ** 2)
        for l in t.features
    )
    np.testing.assert_allclose(float(total), field + attention, rtol=1e-4)
    assert float(aux["loss_L"]) != 0.0  # still reported
    # no L^L gradient: the gradient equals that of the two distillation terms alone
    terms = distill.terms_from_config(stage_loss_config(config, stage("distill", teacher="fst", steps=1, loss=CODE_ARM)))

    def terms_only(p):
        s_ = plan.model.apply(p, batch["moving"], batch["fixed"])
        return sum(term.weight * term.value(t, s_) for term in terms)

    g1 = jax.grad(lambda p: plan.loss_fn(p, plan.frozen, batch)[0])(plan.init_params)
    g2 = jax.grad(terms_only)(plan.init_params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_paper_s3_loss_keeps_the_student_term_and_stage_overrides_stay_local():
    config, batch, done, _ = _stages(output="half")
    paper = _plan(config, "s3", stage("distill", teacher="fst", steps=1, init="coop"), done, batch)
    code = _plan(config, "s3c", stage("distill", teacher="fst", steps=1, init="coop", loss=CODE_ARM), done, batch)
    total, aux = paper.loss_fn(paper.init_params, paper.frozen, batch)
    expected = aux["loss_L"] + config.loss.alpha * aux["deformation"] + config.loss.beta * aux["feature"]
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-5)
    assert config.loss.feature_target == "raw" and config.loss.student_term  # the override did not leak
    t2, aux2 = code.loss_fn(code.init_params, code.frozen, batch)
    np.testing.assert_allclose(float(t2), float(aux2["deformation"] + aux2["feature"]), rtol=1e-5)
    with pytest.raises(ValueError, match="no field"):
        _plan(config, "bad", stage("distill", teacher="fst", steps=1, loss={"alpah": 1.0}), done, batch)


def test_student_initialised_from_s1_starts_from_its_parameters_and_frozen_teacher_gets_no_gradient():
    config, batch, done, _ = _stages(output="half")
    plan = _plan(config, "s3", stage("distill", teacher="fst", steps=1, init="coop"), done, batch)
    for a, b in zip(jax.tree_util.tree_leaves(plan.init_params), jax.tree_util.tree_leaves(done["coop"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g_frozen = jax.grad(lambda f: plan.loss_fn(plan.init_params, f, batch)[0])(plan.frozen)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g_frozen))
