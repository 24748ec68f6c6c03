"""The rest of the paper: pyramid backbone, eq. 11, every config under configs/, the affine network."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crd_jax import losses
from crd_jax.compile import run_once, shapes_only
from crd_jax.config import PYD, set_steps
from crd_jax.data import PairLoader, SyntheticConfig, SyntheticDataset
from crd_jax.models import build as mbuild
from crd_jax.models.affine import AffineNet, affine_field
from crd_jax.ops.spatial import warp
from crd_jax.training import distill
from crd_jax.training.stages import Trained, plan_stage, stage_model_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.py") if not p.name.startswith("_"))


def _pyd_arch(diffeomorphic=False):
    from crd_jax.config import base_config

    c = base_config().model
    for k, v in PYD.items():
        c[k] = v
    c.diffeomorphic = diffeomorphic
    return mbuild.architecture(c)


@pytest.mark.parametrize("diffeomorphic", [False, True])
@pytest.mark.parametrize("factor", [1, 2])
def test_pyramid_fields_and_two_stream_features_per_level(diffeomorphic, factor):
    model = mbuild.registrar_from_config(_pyd_arch(diffeomorphic), factor)
    x = jnp.zeros((1, 64, 96, 1))
    out = jax.eval_shape(
        lambda: model.apply(
            model.backbone.init(jax.random.PRNGKey(0), x[:, ::factor, ::factor], x[:, ::factor, ::factor])["params"], x, x
        )
    )
    low = (64 // factor, 96 // factor)
    assert sorted(out["fields"]) == [0, 1, 2, 3, 4]
    for level in range(5):
        size = tuple(s // 2**level for s in low)
        assert out["fields"][level].shape == (1, *size, 2)
        channels = 2 * (16 if level == 0 else 32)  # moving and fixed streams
        assert out["features"][level].shape == (1, *size, channels)
    assert out["disp"].shape == (1, 64, 96, 2)


def test_pyramid_shares_encoder_weights_and_coarse_to_fine_composes():
    model = mbuild.registrar_from_config(_pyd_arch(), 1)
    x = jnp.zeros((1, 32, 32, 1))
    params = model.init(jax.random.PRNGKey(0), x, x)
    assert set(params) == {"encoder", "estimator"}  # one encoder for both images
    # With all residual heads at a constant bias, each level adds its shift: 5 levels of 0.25 voxel at
    # their own scale compose to 0.25 * (16 + 8 + 4 + 2 + 1) voxels at full resolution.
    params = jax.tree_util.tree_map(lambda p: p, params)
    for level in range(5):
        head = params["estimator"][f"flow_{level}"]["conv"]
        head["kernel"] = jnp.zeros_like(head["kernel"])
        head["bias"] = jnp.asarray([0.25, 0.0])
    out = jax.jit(model.apply)(params, x, x)
    np.testing.assert_allclose(out["disp"][0, 8:-8, 8:-8, 0], 0.25 * 31, atol=1e-4)
    np.testing.assert_allclose(out["fields"][4][0, ..., 0], 0.25, atol=1e-6)


def test_eq11_is_the_sum_of_per_level_mses():
    rng = np.random.default_rng(0)
    fields = lambda: {l: jnp.asarray(rng.normal(size=(1, 16 // 2**l, 16 // 2**l, 2)), jnp.float32) for l in range(4)}  # noqa: E731
    t, s = {"fields": fields(), "disp_low": None}, {"fields": fields(), "disp_low": None}
    expected = sum(float(np.mean((np.asarray(t["fields"][l]) - np.asarray(s["fields"][l])) ** 2)) for l in range(4))
    assert float(distill.deformation_loss(t, s)) == pytest.approx(expected, rel=1e-6)
    # A U-Net student has no intermediate fields: eq. 8 on the final low-resolution field.
    a, b = jnp.ones((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 2))
    assert float(distill.deformation_loss({"disp_low": a}, {"disp_low": b})) == 1.0


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _shrink(config):
    """The config's models and stages on tiny synthetic 2-D data (the models are N-d generic)."""
    config.data.kind = "synthetic"
    config.data.ndim = 2
    config.data.slice_axis = -1
    side = 32 * 2 ** max(int(stage_model_config(config, config.stages[n]).get("shift", 1)) for n in config.pipeline)
    config.data.synthetic.shape = (side, side)
    set_steps(config, 2)
    return config


def _train_step(loss_fn, opt):
    def step(params, state, frozen, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def _plan_pipeline(config, batch, run_stage=None):
    """Plans every stage of ``config.pipeline`` in order (each stage sees the earlier ones' results) and
    hands each plan to ``run_stage``, which returns the stage's trained parameters."""
    done = {}
    for i, name in enumerate(config.pipeline):
        plan = plan_stage(name, config.stages[name], config, done, jax.random.PRNGKey(i), batch)
        params = run_stage(name, plan) if run_stage else plan.init_params
        done[name] = Trained(plan.model, plan.full_params(params), plan.spec)
    return done


def _batch(config):
    ds = SyntheticDataset(SyntheticConfig(shape=tuple(config.data.synthetic.shape), num_subjects=4))
    return PairLoader(ds, 1, seed=0).batch(0)


def _program_signature(config) -> str:
    """What determines the train steps: models, losses, stages and input size, not data source or names."""
    stages = {}
    for name in config.pipeline:
        block = dict(config.stages[name].to_dict())
        for key in ("steps", "evaluate", "label"):
            block.pop(key, None)
        stages[name] = block
    return json.dumps(
        {
            "model": config.model.to_dict(),
            "loss": config.loss.to_dict(),
            "stages": stages,
            "pipeline": list(config.pipeline),
            "shape": list(config.data.synthetic.shape),
        },
        sort_keys=True,
        default=str,
    )


def _configs_by_program():
    """Configs grouped by the training program they define (e.g. one model on OASIS, Mindboggle and LPBA40)."""
    groups = {}
    for path in CONFIGS:
        groups.setdefault(_program_signature(_shrink(_load(path))), []).append(path)
    return list(groups.values())


_GROUPS = _configs_by_program()


@pytest.mark.slow
@pytest.mark.parametrize("paths", _GROUPS, ids=["+".join(str(p.relative_to(ROOT / "configs")) for p in g) for g in _GROUPS])
def test_every_config_plans_and_traces_every_train_step(paths):
    """Every config's models build and every stage's train step (loss, gradient, Adam update) is well formed:
    a shape-only dry run (traced, not compiled: ``shapes_only`` and ``jax.eval_shape``). Configs that define
    the same program (same models, losses, stages and input size) are checked once."""
    config = _shrink(_load(paths[0]))
    opt = optax.adam(1e-4)

    def trace(name, plan):
        params = plan.init_params
        state = jax.eval_shape(opt.init, params)
        new_params, _, loss = jax.eval_shape(_train_step(plan.loss_fn, opt), params, state, plan.frozen, batch)
        assert loss.shape == () and loss.dtype == jnp.float32, (paths[0].name, name)
        assert jax.tree_util.tree_structure(new_params) == jax.tree_util.tree_structure(params), (paths[0].name, name)
        shapes = lambda t: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
        assert shapes(new_params) == shapes(params), (paths[0].name, name)
        return params

    batch = _batch(config)
    with shapes_only():
        done = _plan_pipeline(config, batch, trace)
    assert set(done) == set(config.pipeline)


# The stages that run for real, chosen so that every kind of training program runs once: each stage kind on
# each backbone (VM, VM-diff, Pyd-diff; plain Pyd is Pyd-diff without the integration; the cooperative
# stage runs the backbone at both resolutions, as the baselines do), the 1/4-resolution
# (n = 4) scheme, the cascade teacher, teachers F and G, a registrar teacher with downsampled features, a
# high-resolution light student and the frozen affine stage. The other configs change widths, weights or
# datasets of these programs, which the dry run above covers. Earlier stages of a chain are initialised only.
# The 2-D VM program (synthetic_vm_2d.py) is left out: tests/test_training.py trains its five stages (20 steps,
# the loss decreasing) and runs train.py on it in fresh processes.
EXECUTED = {
    "lpba40_vm_diff.py": ["coop", "fst", "vm_l_crd"],
    "lpba40_pyd_diff.py": ["coop", "fst", "vm_l_crd"],
    "mindboggle_vm_ll.py": ["coop", "fst", "vm_l_crd"],
    "ablations/teacher_c.py": ["cascade_l", "vm_l_by_c"],
    "ablations/teacher_f.py": ["joint_f"],
    "ablations/teacher_g.py": ["fst_g", "vm_l_by_g"],
    "ablations/teacher_a_feature_down.py": ["vm_l_by_a_down"],
    "ablations/light_models.py": ["vm_light_36"],
    "ablations/affine_stage.py": ["affine", "vm_h"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_each_kind_of_training_program_runs_two_finite_steps(name):
    config = _shrink(_load(ROOT / "configs" / name))
    assert set(EXECUTED[name]) <= set(config.pipeline), name
    opt = optax.adam(1e-4)
    batch = _batch(config)

    def run(stage, plan):
        if stage not in EXECUTED[name]:
            return plan.init_params
        params, state = plan.init_params, opt.init(plan.init_params)
        # Two steps of a tiny problem: compile without backend optimisation (several times faster).
        step = (
            jax.jit(_train_step(plan.loss_fn, opt))
            .lower(params, state, plan.frozen, batch)
            .compile(compiler_options={"xla_backend_optimization_level": 0})
        )
        losses_seen = []
        for _ in range(2):
            params, state, loss = step(params, state, plan.frozen, batch)
            losses_seen.append(float(loss))
        assert np.isfinite(losses_seen).all(), (name, stage, losses_seen)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params)), (name, stage)
        changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, plan.init_params)
        assert any(jax.tree_util.tree_leaves(changed)), (name, stage)  # the update reached the parameters
        return params

    _plan_pipeline(config, batch, run)


@pytest.mark.slow
def test_affine_network_recovers_a_known_affine_better_than_identity():
    from crd_jax.data import make_subject

    shape = (64, 64)
    fixed = jnp.asarray(make_subject(SyntheticConfig(shape=shape), 0)[0])[None, ..., None]
    rng = np.random.default_rng(3)
    true_a = jnp.asarray(rng.normal(0, 0.06, (1, 2, 2)), jnp.float32)
    true_t = jnp.asarray(rng.normal(0, 2.5, (1, 2)), jnp.float32)
    # The moving image is the fixed one pulled through the inverse map, so warping it back by the true
    # affine recovers the fixed image.
    true_disp = affine_field(true_a, true_t, shape)
    inv = jnp.linalg.inv(jnp.eye(2) + true_a) - jnp.eye(2)
    moving = warp(fixed, affine_field(inv, -jnp.einsum("bij,bj->bi", jnp.eye(2) + inv, true_t), shape))
    net = AffineNet(channels=(8, 16, 32, 32))
    params = run_once(lambda k: net.init(k, moving, fixed)["params"], jax.random.PRNGKey(0))
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            return losses.ncc(fixed, warp(moving, net.apply({"params": p}, moving, fixed)["disp"]), window=9)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(300):
        params, state, _ = step(params, state)
    disp = net.apply({"params": params}, moving, fixed)["disp"]
    inner = (0, slice(8, -8), slice(8, -8))
    error = float(jnp.sqrt(jnp.mean((disp[inner] - true_disp[inner]) ** 2)))
    identity_error = float(jnp.sqrt(jnp.mean(true_disp[inner] ** 2)))
    assert error < 0.35 * identity_error, (error, identity_error)
