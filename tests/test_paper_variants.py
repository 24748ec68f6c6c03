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
from crd_jax.compile import run_once
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
    out = jax.eval_shape(lambda: model.apply(model.backbone.init(jax.random.PRNGKey(0), x[:, ::factor, ::factor], x[:, ::factor, ::factor])["params"], x, x))
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


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Identical train steps of different configs (the same model on another dataset) compile once."""
    old = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                            "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


_COMPILED = {}  # (training-program signature, stage) -> compiled train step


def _program_signature(config) -> str:
    """What determines the train steps: models, losses, stages and input size, not data source or names."""
    stages = {}
    for name in config.pipeline:
        block = dict(config.stages[name].to_dict())
        for key in ("steps", "evaluate", "label"):
            block.pop(key, None)
        stages[name] = block
    return json.dumps({"model": config.model.to_dict(), "loss": config.loss.to_dict(), "stages": stages,
                       "pipeline": list(config.pipeline), "shape": list(config.data.synthetic.shape)},
                      sort_keys=True, default=str)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_builds_its_models_and_runs_two_train_steps(path, compile_cache):
    config = _shrink(_load(path))
    signature = _program_signature(config)
    shape = tuple(config.data.synthetic.shape)
    ds = SyntheticDataset(SyntheticConfig(shape=shape, num_subjects=4))
    batch = PairLoader(ds, 1, seed=0).batch(0)
    done = {}
    for i, name in enumerate(config.pipeline):
        plan = plan_stage(name, config.stages[name], config, done, jax.random.PRNGKey(i), batch)
        opt = optax.adam(1e-4)
        params, state = plan.init_params, opt.init(plan.init_params)

        def step(params, state, frozen, batch, loss_fn=plan.loss_fn):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        # Two steps of a tiny problem: compile without backend optimisation (several times faster), once
        # per distinct training program (configs that differ only in their dataset share them).
        key = (signature, name)
        if key not in _COMPILED:
            _COMPILED[key] = jax.jit(step).lower(params, state, plan.frozen, batch).compile(
                compiler_options={"xla_backend_optimization_level": 0})
        for _ in range(2):
            params, state, loss = _COMPILED[key](params, state, plan.frozen, batch)
            assert np.isfinite(float(loss)), (path.name, name)
        done[name] = Trained(plan.model, plan.full_params(params), plan.spec)


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
