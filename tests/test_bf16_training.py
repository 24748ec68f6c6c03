"""Opt-in bfloat16 training (``config.train.bf16``, :func:`crd_jax.ops.conv.bf16_training`).

The reference is ``lax`` with the rounding written out: inputs and weights of every forward convolution, and the
output gradient and weights of every input gradient, rounded to bfloat16 (``astype(bfloat16).astype(float32)``),
then float32 convolutions; the weight gradient of float32 ``x`` and ``dz``. The native kernels must match that
to float32 accuracy (they compute the same products of the same rounded values; only the order of the float32
sums differs), which is far tighter than their distance from plain float32 (about 2^-9 per rounded factor), so
each test also checks that bfloat16 was really used. Where the code rounds a combination of weights (the coarse
upcat backward's summed taps), the check is the rounding-error bound: ``|g - g32| <= 2.01 u (|dz| * |w|)`` with
``u = 2^-9`` (each product of two rounded factors is within ``2u + u^2`` of the exact one).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from crd_jax.ops import native

conv_mod = importlib.import_module("crd_jax.ops.conv")
layers = importlib.import_module("crd_jax.models.layers")

ROOT = Path(__file__).resolve().parents[1]
U = 2.0**-9  # unit roundoff of bfloat16 (8 significant bits)

needs_bf16 = pytest.mark.skipif(not native.has_bf16(), reason="the CPU has neither AVX512-BF16 nor AMX (or no native kernel)")


def _bf(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _rel(a, ref):
    return float(jnp.linalg.norm((a - ref).ravel()) / jnp.linalg.norm(ref.ravel()))


def _lax(x, w, stride):
    nd = x.ndim - 2
    dn = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    pad = tuple((k // 2, k // 2) for k in w.shape[:nd])
    return lax.conv_general_dilated(x, w, (stride,) * nd, pad, dimension_numbers=dn)


def _act(z, slope):
    return z if slope is None else jnp.where(z >= 0, z, slope * z)


# --- the reference: lax with bfloat16 rounding where the kernels round ------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def emulated_conv(x, w, b, stride, slope):
    """bf16-training semantics in lax: forward of bf16(x), bf16(w) where C_out >= 8 (the flow head stays float32),
    input gradient of bf16(dz), bf16(w) where C_in >= 8, weight gradient of float32 x and dz."""
    fwd16 = w.shape[-1] >= 8
    return _act(_lax(_bf(x) if fwd16 else x, _bf(w) if fwd16 else w, stride) + b, slope)


def _emulated_fwd(x, w, b, stride, slope):
    y = emulated_conv(x, w, b, stride, slope)
    return y, (x, w, y)


def _emulated_bwd(stride, slope, res, dy):
    x, w, y = res
    dz = dy if slope is None else jnp.where(y >= 0, dy, slope * dy)
    grad16 = w.shape[-2] >= 8
    _, vjp_x = jax.vjp(lambda xx: _lax(xx, _bf(w) if grad16 else w, stride), x)
    _, vjp_w = jax.vjp(lambda ww: _lax(x, ww, stride), w)
    dx = vjp_x(_bf(dz) if grad16 else dz)[0]
    return dx, vjp_w(dz)[0], jnp.sum(dz, axis=tuple(range(dz.ndim - 1)))


emulated_conv.defvjp(_emulated_fwd, _emulated_bwd)


def _up_concat(low, skip):
    up = low
    for axis in range(1, skip.ndim - 1):
        up = jnp.repeat(up, 2, axis=axis)
    up = up[(slice(None), *(slice(0, s) for s in skip.shape[1:-1]), slice(None))]
    return jnp.concatenate([up, skip], axis=-1)


def emulated_upcat(low, skip, w, b, negative_slope=None):
    return emulated_conv(_up_concat(low, skip), w, b, 1, negative_slope)


def _grads(fn, args, dy, bf16):
    """Output and gradients of ``fn`` at ``args`` for cotangent ``dy``, traced inside ``bf16_training(bf16)``."""

    def run(*a):
        with conv_mod.bf16_training(bf16):
            y, vjp = jax.vjp(fn, *a)
        return y, vjp(dy)

    return jax.jit(run)(*args)


def _rng_arrays(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s) * scale, jnp.float32) for s in shapes]


# --- single ops --------------------------------------------------------------------------------------------

CONV_CASES = [
    # input shape, C_out, stride, slope
    ((1, 10, 12, 9, 16), 32, 1, 0.2),  # a decoder layer (Winograd in float32)
    ((1, 10, 12, 9, 16), 32, 2, 0.2),  # an encoder layer (polyphase input gradient)
    ((2, 7, 6, 5, 32), 16, 1, None),
    ((1, 12, 9, 16), 16, 2, 0.2),  # 2-D
    ((1, 8, 6, 10, 16), 3, 1, None),  # the flow head: float32 forward, bfloat16 input gradient
]


@needs_bf16
@pytest.mark.parametrize("xshape,cout,stride,slope", CONV_CASES)
def test_conv_gradients_match_lax_with_bf16_rounding(xshape, cout, stride, slope):
    nd = len(xshape) - 2
    x, w, b = _rng_arrays(0, xshape, (3,) * nd + (xshape[-1], cout), (cout,), scale=1.0)
    w = w * 0.1
    yshape = (xshape[0], *(-(-n // stride) for n in xshape[1:-1]), cout)
    (dy,) = _rng_arrays(1, yshape)

    def fn(x, w, b):
        return conv_mod.conv(x, w, b, stride=stride, negative_slope=slope)

    y, (dx, dw, db) = _grads(fn, (x, w, b), dy, True)
    y_e, (dx_e, dw_e, db_e) = _grads(lambda x, w, b: emulated_conv(x, w, b, stride, slope), (x, w, b), dy, False)
    for got, want in ((y, y_e), (dx, dx_e), (dw, dw_e), (db, db_e)):
        assert _rel(got, want) < 2e-5
    # ... and bfloat16 really ran: plain float32 is ~2^-9 away (the flow head's forward stays float32)
    y32, (dx32, _, _) = _grads(fn, (x, w, b), dy, False)
    assert _rel(dx, dx32) > 1e-4
    assert (_rel(y, y32) > 1e-4) == (cout >= 8)
    for a in (y, dx, dw, db):
        assert a.dtype == jnp.float32


@needs_bf16
@pytest.mark.parametrize(
    "low_shape,cl,cs,cout,mode",
    [
        ((4, 5, 6), 32, 2, 16, "coarse"),
        ((3, 5, 4), 16, 16, 32, "concat"),
        ((5, 7), 32, 16, 32, "coarse"),
        ((5, 7), 32, 16, 32, "concat"),
    ],
)
def test_upcat_conv_gradients_match_lax_with_bf16_rounding(low_shape, cl, cs, cout, mode, upcat_mode):
    upcat_mode(mode)
    nd = len(low_shape)
    skip_shape = (1, *(2 * n for n in low_shape), cs)
    low, skip, w, b = _rng_arrays(2, (1, *low_shape, cl), skip_shape, (3,) * nd + (cl + cs, cout), (cout,))
    w = w * 0.1
    (dy,) = _rng_arrays(3, (*skip_shape[:-1], cout))

    def fn(low, skip, w, b):
        return conv_mod.conv_upsampled_concat(low, skip, w, b, negative_slope=0.2)

    y, (dlow, dskip, dw, db) = _grads(fn, (low, skip, w, b), dy, True)
    y_e, (dlow_e, dskip_e, dw_e, db_e) = _grads(lambda *a: emulated_upcat(*a, negative_slope=0.2), (low, skip, w, b), dy, False)
    y32, (dlow32, dskip32, _, _) = _grads(fn, (low, skip, w, b), dy, False)
    if mode == "coarse" and cs < 8:
        # the coarse backward's skip gradient is a convolution of its own with C_s output channels: float32 under 8
        # (as the flow head), differing from float32 only through dz (the LeakyReLU's branches of y)
        dskip_e = jax.vjp(lambda s: _lax(_up_concat(low, s), w, 1), skip)[1](jnp.where(y_e >= 0, dy, 0.2 * dy))[0]
    for got, want in ((y, y_e), (dskip, dskip_e), (dw, dw_e), (db, db_e)):
        assert _rel(got, want) < 2e-5
    if mode == "concat":
        assert _rel(dlow, dlow_e) < 2e-5
    else:
        # the coarse backward rounds the summed taps W' = M w: the rounding-error bound against float32 of the
        # same dz (read off the emulation's output, so the LeakyReLU's branches agree)
        dz = jnp.where(y_e >= 0, dy, 0.2 * dy)
        _, vjp = jax.vjp(lambda lo: _lax(_up_concat(lo, skip), w, 1), low)
        _, vjp_abs = jax.vjp(lambda lo: _lax(_up_concat(lo, jnp.abs(skip)), jnp.abs(w), 1), low)
        exact, bound = vjp(dz)[0], vjp_abs(jnp.abs(dz))[0]
        assert bool(jnp.all(jnp.abs(dlow - exact) <= 2.01 * U * bound + 1e-5))
        assert _rel(dlow, exact) > 1e-4  # bfloat16 really ran
    assert _rel(y, y32) > 1e-4 and _rel(dlow, dlow32) > 1e-4


@needs_bf16
def test_forward_is_within_the_bf16_rounding_bound_of_float32():
    x, w, b = _rng_arrays(4, (1, 9, 10, 11, 16), (3, 3, 3, 16, 32), (32,))

    def fn(x, w, b):
        return conv_mod.conv(x, w, b)

    y, _ = _grads(fn, (x, w, b), jnp.zeros((1, 9, 10, 11, 32)), True)
    exact = _lax(x, w, 1) + b
    bound = _lax(jnp.abs(x), jnp.abs(w), 1)
    assert bool(jnp.all(jnp.abs(y - exact) <= 2.01 * U * bound + 1e-5))


# --- a whole network -----------------------------------------------------------------------------------------


def _vm_loss_and_params(shape=(16, 32, 16)):
    from crd_jax.config import base_config
    from crd_jax.losses import registration_loss
    from crd_jax.models import build as mbuild

    model = mbuild.registrar_from_config(mbuild.architecture(base_config().model), 1)
    rng = np.random.default_rng(5)
    moving, fixed = (jnp.asarray(rng.random((1, *shape, 1)), jnp.float32) for _ in range(2))
    params = model.init(jax.random.PRNGKey(0), moving, fixed)

    def loss(p):
        return registration_loss(moving, fixed, model.apply(p, moving, fixed).disp)[0]

    return loss, params, model, (moving, fixed)


def _loss_grad(loss, params, bf16):
    def run(p):
        with conv_mod.bf16_training(bf16):
            return jax.value_and_grad(loss)(p)

    return jax.jit(run)(params)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@needs_bf16
def test_vm_gradients_match_lax_with_bf16_rounding_and_float32_within_bf16_noise(monkeypatch, upcat_mode):
    upcat_mode("concat")  # the emulation rounds w, the coarse backward the summed taps (tested above, per op)
    loss, params, _, _ = _vm_loss_and_params()
    value, grads = _loss_grad(loss, params, True)
    with monkeypatch.context() as m:
        m.setattr(layers, "conv", lambda x, w, b, stride=1, negative_slope=None: emulated_conv(x, w, b, stride, negative_slope))
        m.setattr(layers, "conv_upsampled_concat", emulated_upcat)
        value_e, grads_e = _loss_grad(loss, params, False)
        m.setattr(layers, "conv", conv_mod.conv_reference)  # plain float32 lax
        m.setattr(
            layers,
            "conv_upsampled_concat",
            lambda lo, sk, w, b, negative_slope=None: conv_mod.conv_reference(
                _up_concat(lo, sk), w, b, negative_slope=negative_slope
            ),
        )
        value32, grads32 = _loss_grad(loss, params, False)
    g, g_e, g32 = _flat(grads), _flat(grads_e), _flat(grads32)
    assert abs(float(value - value_e)) < 1e-5 * abs(float(value))
    assert _rel(g, g_e) < 1e-3  # float32 sums in another order: far below bfloat16's own effect
    assert 1e-3 < _rel(g, g32) < 0.1  # bfloat16 ran; the gradient keeps its direction
    assert float(jnp.dot(g, g32) / (jnp.linalg.norm(g) * jnp.linalg.norm(g32))) > 0.99
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(grads))


@needs_bf16
def test_train_step_keeps_float32_state_lowers_bf16_only_in_the_step_and_the_loss_decreases():
    import optax

    from crd_jax.training import distributed
    from crd_jax.training.loop import make_train_step

    loss, params, model, (moving, fixed) = _vm_loss_and_params()
    mesh = distributed.data_mesh()
    optimizer = optax.adam(1e-3)
    step = make_train_step(lambda p, frozen, batch: (loss(p), {}), optimizer, mesh, bf16=True)
    state = (params, optimizer.init(params))
    batch = {"moving": moving, "fixed": fixed}
    hlo = step.lower(*state, {}, batch).as_text()
    assert "bf16 = 1" in hlo  # the step's convolutions run the bfloat16 kernels
    losses = []
    for _ in range(6):
        p, o, metrics = step(*state, {}, batch)
        state = (p, o)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype  # params, Adam's moments (and its step count)
    # inference after bfloat16 training: float32 kernels, the lax reference's values
    apply = jax.jit(lambda p: model.apply(p, moving, fixed).disp)
    assert "bf16 = 1" not in apply.lower(state[0]).as_text()
    assert not conv_mod.bf16_inference()


def test_s3_teacher_targets_stay_float32_inside_a_bf16_step():
    """The frozen teacher run inside the step (no teacher cache) keeps float32 kernels, so its targets equal the
    cache's (filled outside the step in float32), whichever a resumed run uses; the student's convolutions in
    the same block run bfloat16."""
    from crd_jax.training.distill import make_loss

    _, params, model, (moving, fixed) = _vm_loss_and_params()
    dl = make_loss(model, model, terms=())
    batch = {"moving": moving, "fixed": fixed}

    def lowered(fn):
        def run(p):
            with conv_mod.bf16_training(True):
                return fn(p)

        return jax.jit(run).lower(params).as_text()

    teacher = lowered(lambda p: dl.teacher_output(p, batch).disp)
    student = lowered(lambda p: model.apply(p, moving, fixed).disp)
    assert "bf16 = 1" not in teacher and "bf16 = 0" in teacher
    assert ("bf16 = 1" in student) == native.has_bf16()


def test_the_setting_is_scoped_to_its_block_and_static_in_the_trace():
    x, w, b = _rng_arrays(6, (1, 6, 6, 6, 16), (3, 3, 3, 16, 16), (16,))
    with conv_mod.bf16_training():
        inside = jax.jit(lambda x: conv_mod.conv(x, w, b)).lower(x).as_text()
    outside = jax.jit(lambda x: conv_mod.conv(x, w, b)).lower(x).as_text()
    assert "bf16 = 0" in outside and "bf16 = 1" not in outside
    assert ("bf16 = 1" in inside) == native.has_bf16()


# --- the config flag as a user types it -------------------------------------------------------------------------


def _train(workdir, *overrides, env=None):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs/synthetic_vm_2d.py'}",
        f"--config.workdir={workdir}",
    ]
    cmd += [
        "--config.train.progress_bar=False",
        "--config.data.synthetic.shape=(32,32)",
        "--config.data.synthetic.train=6",
        "--config.data.synthetic.val=0",
        "--config.data.synthetic.test=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.batch_size=2",
        "--config.pipeline=('vm_l',)",
        "--config.stages.vm_l.steps=3",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=900)


@needs_bf16
@pytest.mark.slow
def test_train_py_with_bf16_trains_records_it_and_resumes_only_with_it(tmp_path):
    proc = _train(tmp_path / "run", "--config.train.bf16=True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bfloat16 training (" in proc.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["bf16"] is True
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if r.get("stage") == "vm_l" and "loss" in r) == [1, 2, 3]
    # the workdir was trained in bfloat16: resuming it without the flag is refused with one line
    again = _train(tmp_path / "run")
    assert again.returncode == 2
    assert "config.train.bf16" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_train_py_refuses_bf16_where_the_kernel_cannot_run_it(tmp_path):
    proc = _train(tmp_path / "run", "--config.train.bf16=True", env={"CRD_JAX_FAST_CONV": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config.train.bf16" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not (tmp_path / "run").exists()


def test_check_refuses_a_non_boolean_flag():
    from crd_jax.config import base_config
    from crd_jax.errors import InputError
    from crd_jax.training.config_checks import check_values

    c = base_config()
    c.train.bf16 = False
    check_values(c)
    with pytest.raises(InputError, match="train.bf16"):
        check_values(_with(c, "train.bf16", 1))


def _with(config, dotted, value):
    import copy

    c = copy.deepcopy(config)
    section, field = dotted.split(".")
    with c.ignore_type():
        c[section][field] = value
    return c


# --- the Dice comparison's analysis (benchmarks/bf16_training.py), on made-up tables --------------------------


def test_dice_analysis_follows_the_protocol():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bf16_training

    pairs = [("a", "b"), ("b", "a"), ("a", "c")]
    base = np.array([0.60, 0.62, 0.58])
    tables = {
        ("float32", 0): dict(zip(pairs, base)),
        ("float32", 1): dict(zip(pairs, base + [0.010, 0.020, 0.000])),
        ("bf16", 0): dict(zip(pairs, base + [0.002, -0.001, 0.002])),
        ("bf16", 1): dict(zip(pairs, base + [0.010, 0.020, 0.000] + [-0.001, 0.000, 0.001])),
    }
    a = bf16_training.analyse(tables)
    d0, d1 = np.array([0.002, -0.001, 0.002]), np.array([-0.001, 0.000, 0.001])
    assert a["bf16_minus_float32"]["0"]["mean"] == pytest.approx(d0.mean())
    assert a["bf16_minus_float32"]["1"]["sd"] == pytest.approx(d1.std(ddof=1))
    assert a["mean_bf16_minus_float32"] == pytest.approx((d0.mean() + d1.mean()) / 2)
    assert a["pairs_bf16_minus_float32"]["mean"] == pytest.approx(((d0 + d1) / 2).mean())
    assert a["float32_seed1_minus_seed0"]["mean"] == pytest.approx(0.01)
    assert a["within_noise"]  # smaller in the mean and in the spread than two float32 seeds
    tables["bf16", 1] = dict(zip(pairs, base + 0.05))  # a gross effect
    assert not bf16_training.analyse(tables)["within_noise"]


def test_a_training_run_turns_bf16_inference_off_while_it_trains_and_restores_it(tmp_path, monkeypatch):
    # CRD_JAX_CONV_BF16=1 (bfloat16 inference) must not round a run's frozen teachers, S3's teacher cache or its
    # validation: the pipeline holds it off while its stages run, and gives the process its setting back after
    from crd_jax.config import base_config
    from crd_jax.training import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "_run_stages", lambda *a, **k: seen.append(conv_mod.bf16_inference()) or [])
    before = conv_mod.bf16_inference()
    c = base_config()
    c.data.kind, c.data.ndim = "synthetic", 2
    c.data.synthetic.shape = (32, 32)
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 4, 0, 2
    c.workdir = str(tmp_path / "run")
    try:
        conv_mod.bf16_inference(True)
        assert pipeline.run(c) == [] and seen == [False]
        assert conv_mod.bf16_inference() is True
    finally:
        conv_mod.bf16_inference(before)


def test_a_jitted_predictor_is_traced_again_when_bf16_inference_changes():
    # jax.jit's cache does not see the process's trace settings: a predictor traced with bfloat16 inference on
    # must not be reused once it is off (a run's validation after a bf16 call), nor the other way round
    from crd_jax.compile import persistent_jit

    seen = []

    def fn(x):
        seen.append(conv_mod.bf16_inference())
        return x + 1.0

    f = persistent_jit(fn, context="test")
    before = conv_mod.bf16_inference()
    try:
        for setting in (True, False, True, False):
            conv_mod.bf16_inference(setting)
            assert float(f(jnp.float32(1.0))) == 2.0
    finally:
        conv_mod.bf16_inference(before)
    assert seen == [True, False]  # traced once per setting, then reused


@needs_bf16
def test_a_stored_convolution_program_follows_bf16_inference_both_ways():
    from crd_jax.compile import persistent_jit

    k = jax.random.split(jax.random.PRNGKey(0), 2)
    x, w = jax.random.normal(k[0], (1, 8, 8, 8, 16)), 0.1 * jax.random.normal(k[1], (3, 3, 3, 16, 16))
    f = persistent_jit(lambda x: conv_mod.conv(x, w, jnp.zeros(16)), context="test")
    reference = np.asarray(conv_mod.conv_reference(x, w, jnp.zeros(16)))
    before, outs = conv_mod.bf16_inference(), []
    try:
        for setting in (True, False, True, False):
            conv_mod.bf16_inference(setting)
            outs.append(np.abs(np.asarray(f(x)) - reference).max())
    finally:
        conv_mod.bf16_inference(before)
    assert outs[0] > 1e-3 and outs[2] == outs[0]  # bfloat16 ran, and ran again
    assert outs[1] < 1e-4 and outs[3] == outs[1]  # float32 after it, both times
