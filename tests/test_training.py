"""The CRD pipeline: stage losses, freezing, teacher shapes, data parallelism, multi-process, resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax.allocator import training_runs_in_huge_pages
from crd_jax.config import base_config, set_steps
from crd_jax.data import SyntheticConfig, SyntheticDataset, PairLoader
from crd_jax.models import build as mbuild
from crd_jax.training import distributed
from crd_jax.model_io import load_model
from crd_jax.training.loop import make_optimizer, make_train_step
from crd_jax.training.stages import Trained, plan_stage

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(shape=(32, 32), shift=1):
    c = base_config()
    c.data.kind = "synthetic"
    c.data.ndim = len(shape)
    c.data.synthetic.shape = shape
    c.data.synthetic.train, c.data.synthetic.val, c.data.synthetic.test = 6, 0, 3
    c.model.shift = shift
    c.train.lr = 1e-3
    return c


def _example(cfg, batch=2):
    s = cfg.data.synthetic
    ds = SyntheticDataset(SyntheticConfig(shape=tuple(s.shape), num_subjects=6, max_displacement=3.0))
    return PairLoader(ds, batch, seed=0).batch(0)


def _plan_all(cfg, example):
    """Plans every stage of the default pipeline, finishing each with its initial parameters."""
    done, plans = {}, {}
    for i, name in enumerate(cfg.pipeline):
        plan = plan_stage(name, cfg.stages[name], cfg, done, jax.random.PRNGKey(i), example)
        plans[name] = plan
        done[name] = Trained(plan.model, plan.full_params(plan.init_params), plan.spec)
    return plans


def _run_steps(plan, cfg, batch, steps):
    mesh = distributed.data_mesh()
    optimizer = make_optimizer(cfg.train, steps)
    step_fn = make_train_step(plan.loss_fn, optimizer, mesh)
    params = distributed.replicate(mesh, plan.init_params)
    opt_state = distributed.replicate(mesh, optimizer.init(plan.init_params))
    frozen = distributed.replicate(mesh, plan.frozen)
    gbatch = distributed.global_batch(mesh, batch)
    losses = []
    for _ in range(steps):
        params, opt_state, metrics = step_fn(params, opt_state, frozen, gbatch)
        losses.append(float(metrics["loss"]))
    return losses, distributed.to_host(params)


@pytest.mark.slow
def test_every_stage_loss_is_finite_and_decreases_on_a_fixed_pair_2d():
    cfg = tiny_config((32, 32))
    example = _example(cfg)
    plans = _plan_all(cfg, example)
    assert [p.spec["label"] for p in plans.values()] == ["VM-H", "VM-L", "VM-H (RC)", "FST", "VM-L-CRD"]
    for name, plan in plans.items():
        losses, _ = _run_steps(plan, cfg, example, 20)
        assert np.all(np.isfinite(losses)), name
        assert np.mean(losses[-3:]) < losses[0] - 0.01, (name, losses[0], losses[-3:])


@pytest.mark.slow
def test_distillation_loss_decreases_in_3d_and_teacher_stays_frozen():
    cfg = tiny_config((32, 32, 32))
    example = _example(cfg, batch=1)
    plans = _plan_all(cfg, example)
    for name in ("fst", "vm_l_crd"):
        plan = plans[name]
        frozen_before = jax.tree_util.tree_map(np.array, plan.frozen)
        losses, trained = _run_steps(plan, cfg, example, 12)
        assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0], (name, losses)
        # The frozen model is bit-identical after training, and the trained params did move.
        jax.tree_util.tree_map(np.testing.assert_array_equal, plan.frozen, frozen_before)
        moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), trained, plan.init_params)
        assert any(jax.tree_util.tree_leaves(moved))
    # The student's optimizer sees only the student's parameters.
    opt_state = make_optimizer(cfg.train, 10).init(plans["vm_l_crd"].init_params)
    n_student = sum(np.size(x) for x in jax.tree_util.tree_leaves(plans["vm_l_crd"].init_params))
    n_state = sum(np.size(x) for x in jax.tree_util.tree_leaves(opt_state))
    assert 2 * n_student <= n_state <= 2 * n_student + 4  # Adam moments + step counters


@pytest.mark.parametrize("shift,shape", [(1, (32, 32, 32)), (2, (64, 64, 64)), (1, (64, 48)), (2, (64, 64))])
def test_teacher_features_have_exactly_the_student_shapes(shift, shape):
    cfg = tiny_config(shape, shift)
    arch = mbuild.architecture(cfg.model)
    n = 2**shift
    teacher = mbuild.teacher_from_config(arch, n)
    student = mbuild.registrar_from_config(arch, n)
    x = jnp.zeros((1, *shape, 1))

    def shapes():
        bp = teacher.backbone.init(jax.random.PRNGKey(0), x, x)["params"]
        high, low = teacher.backbone_features(bp, x, x)
        hp = teacher.head.init(jax.random.PRNGKey(1), high, low)["params"]
        t = teacher.apply({"backbone": bp, "head": hp}, x, x)
        s = student.apply(bp, x, x)
        return t, s

    t, s = jax.eval_shape(shapes)
    levels = sorted(t["features"])
    assert levels == list(range(0, 5 - shift))  # F^T_0 .. F^T_{4-k}
    for level in levels:
        assert t["features"][level].shape == s["features"][level].shape, level
    assert t["disp_low"].shape == s["disp_low"].shape
    assert t["disp"].shape == (1, *shape, len(shape))


# --- whole-program runs (subprocesses: device count and processes are fixed when JAX starts) ----------


def _devices(n: int) -> dict:
    """``XLA_FLAGS`` for ``n`` host devices, added to the flags the suite sets (conftest.py: the LLVM backend at
    optimisation level 0), so that both sides of a comparison compile alike and as cheaply as the rest."""
    return {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()}


def _train(workdir, *overrides, env=None, config="configs/synthetic_vm_2d.py", check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / config}", f"--config.workdir={workdir}"]
    cmd += ["--config.train.progress_bar=False", *overrides]
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


SMALL = [
    "--config.data.synthetic.shape=(32,32)",
    "--config.data.synthetic.train=6",
    "--config.data.synthetic.val=0",
    "--config.data.synthetic.test=0",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
]


def _params(workdir, stage):
    params, spec = load_model(Path(workdir) / "stages" / stage / "model")
    return params, spec


def _losses(workdir, stage):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("stage") == stage and "loss" in r}


def _assert_same_params(a, b, tol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path):
    args = SMALL + ["--config.pipeline=('coop',)", "--config.stages.coop.steps=3", "--config.train.batch_size=2"]
    one = _train(tmp_path / "one", *args, env=_devices(1))
    two = _train(tmp_path / "two", *args, env=_devices(2))
    assert "1 device(s)" in one.stderr and "2 device(s)" in two.stderr
    l1, l2 = _losses(tmp_path / "one", "coop"), _losses(tmp_path / "two", "coop")
    assert sorted(l1) == [1, 2, 3]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], abs=1e-5)
    _assert_same_params(_params(tmp_path / "one", "coop")[0], _params(tmp_path / "two", "coop")[0], 1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_through_jax_distributed_match_one_process(tmp_path):
    args = SMALL + ["--config.pipeline=('vm_l',)", "--config.stages.vm_l.steps=3", "--config.train.batch_size=2"]
    single = tmp_path / "single"
    _train(single, *args, env=_devices(1))

    def two_processes(multi):
        port = _free_port()
        procs = []
        for pid in range(2):
            cmd = [
                sys.executable,
                str(ROOT / "train.py"),
                f"--config={ROOT / 'configs/synthetic_vm_2d.py'}",
                f"--config.workdir={multi}",
                "--config.train.progress_bar=False",
                *args,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={pid}",
            ]
            env = dict(os.environ, **_devices(1))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs, [p.communicate(timeout=600) for p in procs]

    multi = tmp_path / "multi"
    procs, outs = two_processes(multi)
    if any("Gloo context initialization failed" in err for _, err in outs):
        # Gloo's rendezvous times out after 30 s; on this 2-core machine, shared with the other test worker, it
        # has (once in three suite runs): an environment's limit, not this code's, so once more in a new folder
        multi = tmp_path / "multi-again"
        procs, outs = two_processes(multi)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "2 device(s), 2 process(es)" in outs[0][1]
    l1, l2 = _losses(single, "vm_l"), _losses(multi, "vm_l")
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], abs=1e-5)
    _assert_same_params(_params(single, "vm_l")[0], _params(multi, "vm_l")[0], 1e-5)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_final_params(tmp_path):
    args = SMALL + [
        "--config.pipeline=('vm_h','vm_l')",
        "--config.stages.vm_h.steps=4",
        "--config.stages.vm_l.steps=8",
        "--config.train.checkpoint_every=3",
        "--config.train.batch_size=2",
    ]
    # The straight run compiles everything (no cache); the killed run fills its own compilation cache and the
    # resumed run loads its train steps from it: equal parameters also say that a cached program is the program.
    # the straight run without malloc in huge pages, the resumed one with it where the machine supports it: the
    # allocator must not change a bit of the result (crd_jax/allocator.py)
    _train(tmp_path / "straight", *args, env={"CRD_JAX_CACHE_DIR": "off", "CRD_JAX_HUGEPAGES": "0"})
    cache = {"CRD_JAX_CACHE_DIR": str(tmp_path / "cache")}
    # SIGKILL after step 5 of the second stage: step 3's checkpoint exists, steps 4-5 are lost.
    killed = _train(tmp_path / "resumed", *args, env={"CRD_JAX_DEBUG_KILL_AFTER_STEP": "5", **cache}, check=False)
    assert killed.returncode == -9
    assert (tmp_path / "resumed" / "stages" / "vm_h" / "model").exists()
    assert not (tmp_path / "resumed" / "stages" / "vm_l" / "model").exists()
    assert len(list((tmp_path / "cache" / "xla").iterdir())) > 10  # train.py uses JAX's persistent cache
    again = _train(tmp_path / "resumed", *args, env=cache)
    assert "[vm_h] finished earlier" in again.stderr and "[vm_l] resuming from step 3" in again.stderr
    for stage in ("vm_h", "vm_l"):
        a, b = _params(tmp_path / "straight", stage)[0], _params(tmp_path / "resumed", stage)[0]
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_default_pipeline_end_to_end_writes_results(tmp_path):
    work = tmp_path / "run"
    proc = _train(
        work,
        *SMALL[:2],
        "--config.data.synthetic.train=6",
        "--config.data.synthetic.val=2",
        "--config.data.synthetic.test=3",
        "--config.train.max_steps=3",
        "--config.train.eval_every=3",
        "--config.eval.val_pairs=1",
        "--config.eval.timing_repeats=1",
    )
    # train.py re-executed itself with malloc in huge pages where the machine supports it (crd_jax/allocator.py)
    assert ("malloc in transparent huge pages" in proc.stderr) == training_runs_in_huge_pages(), proc.stderr[-2000:]
    results = json.loads((work / "results.json").read_text())
    assert [r["label"] for r in results] == ["VM-H", "VM-L", "FST", "VM-L-CRD"]
    assert all(r["num_pairs"] == 6 and 0 <= r["dice_mean"] <= 1 for r in results)
    assert results[1]["input_shape"] == [16, 16] and results[0]["input_shape"] == [32, 32]
    table = (work / "results.md").read_text()
    assert "| VM-L-CRD |" in table and "Identity (no registration) Dice" in table
    last = proc.stdout.strip().splitlines()[-1]  # the run ends naming its results file
    assert last.startswith("results: ") and Path(last.split(": ", 1)[1]).resolve() == (work / "results.md").resolve(), last
    # the distillation stage's diagnostics (science issue, item 2) reach results.json and the report
    d = results[3]["diagnostics"]
    assert set(d["ceiling"]) == {"fst", "vm_h", "coop"} and all(0 <= c["ceiling_dice"] <= 1 for c in d["ceiling"].values())
    assert set(d["term_gradients_at_start"]) == {"loss_L", "deformation", "feature"}
    assert all(g["grad_norm"] > 0 for g in d["term_gradients_at_start"].values())
    assert len(d["headroom_pairs"]) == 16 and d["field_distance_start"] >= 0 and d["field_distance_end"] >= 0
    assert 0 <= d["teacher_train_dice"] <= 1 and "#### Distillation diagnostics" in table
    assert json.loads((work / "stages" / "vm_l_crd" / "diagnostics.json").read_text()) == d  # kept with the stage
    config = json.loads((work / "config.json").read_text())
    assert config["train"]["max_steps"] == 3
    assert (work / "tensorboard" / "vm_h").is_dir() and "val/dice" in (work / "metrics.jsonl").read_text()
    _, spec = _params(work, "vm_l_crd")
    assert spec["factor"] == 2 and spec["kind"] == "registrar" and spec["preprocessing"]["canvas_shape"] == [32, 32]
    # A second run finds everything done and rewrites the same table.
    again = _train(
        work,
        *SMALL[:2],
        "--config.data.synthetic.train=6",
        "--config.data.synthetic.val=2",
        "--config.data.synthetic.test=3",
        "--config.train.max_steps=3",
        "--config.train.eval_every=3",
        "--config.eval.val_pairs=1",
        "--config.eval.timing_repeats=1",
        env={"CRD_JAX_HUGEPAGES": "0", "GLIBC_TUNABLES": ""},
    )
    assert again.stderr.count("finished earlier") == 5
    assert "malloc in transparent huge pages" not in again.stderr  # CRD_JAX_HUGEPAGES=0: no re-execution
    assert "diagnostics: ceilings" not in again.stderr  # a finished stage's diagnostics are read, not recomputed
    assert (work / "results.md").read_text() == table


@pytest.mark.slow
def test_missing_data_root_is_a_clear_error(tmp_path):
    proc = _train(tmp_path / "run", config="configs/oasis_vm.py", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.data.root") and "synthetic_vm.py" in last
    proc = _train(tmp_path / "run", "--config.data.root=/nonexistent/oasis", config="configs/oasis_vm.py", check=False)
    assert proc.returncode == 2 and "/nonexistent/oasis: no such folder" in proc.stderr


@pytest.mark.slow
def test_a_resumed_stage_logs_each_step_once(tmp_path):
    """Records logged after the checkpoint a stage resumes from (before a kill) are dropped on resume."""
    import json

    from crd_jax.training.logging import MetricLogger

    log = MetricLogger(tmp_path, enabled=True, progress=False)
    for step in (10, 20, 30):
        log.scalars("vm_h", step, {"loss": 1.0})
    log.scalars("vm_l", 40, {"loss": 1.0})
    log.info("a message")
    log.forget_after("vm_h", 20)  # the run was killed after step 30, the latest checkpoint is step 20
    log.scalars("vm_h", 30, {"loss": 0.5})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in records if "stage" in r]
    assert steps == [("vm_h", 10), ("vm_h", 20), ("vm_l", 40), ("vm_h", 30)]
    assert any(r.get("message") == "a message" for r in records)


@pytest.mark.slow
def test_label_supervised_and_augmented_stages_train_and_run_through_the_pipeline(tmp_path):
    """loss.label_weight: batches carry label maps and every stage's loss has the soft-Dice term; a stage
    with ``augment = "bspline"`` and its own ``seed`` runs end to end."""
    from crd_jax.config import stage
    from crd_jax.data.augment import Augment
    from crd_jax.training import pipeline

    cfg = tiny_config((32, 32))
    cfg.loss.label_weight = 1.0
    s = cfg.data.synthetic
    ds = SyntheticDataset(SyntheticConfig(shape=tuple(s.shape), num_subjects=6, max_displacement=3.0))
    labels = list(range(1, int(s.num_labels) + 1))
    loader = PairLoader(ds, 2, seed=0).for_stage(0, Augment("bspline", 6.0, 1.0), labels)
    example = loader.batch(0)
    assert example["moving_labels"].shape == (2, 32, 32) and example["moving_labels"].max() <= len(labels)
    done = {}
    for i, name in enumerate(("vm_h", "vm_l", "coop", "fst", "vm_l_crd")):
        plan = plan_stage(name, cfg.stages[name], cfg, done, jax.random.PRNGKey(i), example, len(labels))
        done[name] = Trained(plan.model, plan.full_params(plan.init_params), plan.spec)
        loss, aux = plan.loss_fn(plan.init_params, plan.frozen, example)
        assert np.isfinite(float(loss)) and any("dice_loss" in k or k == "loss_L" for k in aux), (name, aux)
    baseline = plan_stage("vm_h", cfg.stages.vm_h, cfg, {}, jax.random.PRNGKey(0), example, len(labels))
    assert "dice_loss" in baseline.loss_fn(baseline.init_params, {}, example)[1]
    losses_, _ = _run_steps(baseline, cfg, example, 15)
    assert np.mean(losses_[-3:]) < losses_[0]
    with pytest.raises(ValueError, match="label maps"):
        plan_stage("vm_h", cfg.stages.vm_h, cfg, {}, jax.random.PRNGKey(0), example, 0)

    cfg.workdir = str(tmp_path / "run")
    cfg.data.synthetic.train, cfg.data.synthetic.val = 4, 2
    cfg.pipeline = ("vm_l",)
    cfg.stages.vm_l = stage("baseline", resolution="low", steps=2, augment="bspline", seed=3)
    cfg.eval.split, cfg.eval.val_pairs, cfg.eval.timing_repeats = "val", 1, 1
    results = pipeline.run(cfg)
    assert results[0]["label"] == "VM-L" and 0 <= results[0]["dice_mean"] <= 1
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "dice_loss" in metrics


@pytest.mark.slow
def test_deadline_saves_the_step_and_a_rerun_resumes_from_it(tmp_path):
    """config.train.deadline (time-boxed runs on a lent GPU): the stage saves the step it reached and stops
    with one line (exit 75); the same command without the deadline resumes from that step, not from 0."""
    import time

    work = tmp_path / "run"
    args = (
        *SMALL[:2],
        "--config.train.max_steps=4",
        "--config.train.checkpoint_every=100",
        "--config.eval.val_pairs=0",
        "--config.pipeline=('vm_h',)",
    )
    proc = _train(work, *args, f"--config.train.deadline={time.time() - 1}", check=False)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("stopped: stage vm_h: deadline reached after step 1")
    assert "Traceback" not in proc.stderr
    assert (work / "stages" / "vm_h" / "ckpt" / "1").exists()
    again = _train(work, *args)
    assert "resuming from step 1" in again.stderr and (work / "stages" / "vm_h" / "model").is_dir()


def test_slurm_tasks_initialize_jax_distributed_from_the_environment(monkeypatch):
    """Under ``srun -n N`` (N > 1) with no coordinator configured, ``jax.distributed.initialize()`` is called
    without arguments (JAX reads Slurm's variables); a single task or no Slurm job stays single-process."""
    from crd_jax.config import base_config

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a, **k: None)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    cfg = base_config().distributed
    for env, expected in (
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, [((), {})]),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, []),
        ({"SLURM_NTASKS": "4"}, []),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "x"}, []),
    ):
        calls.clear()
        for key in ("SLURM_JOB_ID", "SLURM_NTASKS"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        distributed.initialize(cfg)
        assert calls == expected, env
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")  # an explicit coordinator wins
    calls.clear()
    distributed.initialize(cfg)
    assert calls[0][1]["coordinator_address"] == "10.0.0.1:1234"
