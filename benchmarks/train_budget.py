"""Training budget: seconds per step of every stage of the CRD pipeline, split into network forward, network
backward and loss, and the hours that 10,000 steps per stage would take (issue 26, item 1).

    python benchmarks/train_budget.py                  # 128^3, n = 2, batch 1: every stage + PyTorch VM-H / VM-L
    python benchmarks/train_budget.py --quick          # 32^3, one repeat, no PyTorch (seconds; what the test runs)
    python benchmarks/train_budget.py --profile        # where a VM-L and a VM-H step spend their time
                                                       #   -> results/train_profile.{md,json}
    python benchmarks/train_budget.py --bf16 --stages vm_h vm_l --no-torch --repeats 3
                                                       # float32 and bfloat16 training (train.bf16) in the same
                                                       #   rounds -> results/train_budget_bf16.{md,json}

Stages (the 128^3 regime of the paper, n = 2): VM-H and VM-L (baselines, eq. 3 / eq. 5), S1 (resolution
cooperative, eq. 6), FST (S2: fusion head on the frozen S1 backbone, eq. 7), S3 (distillation from the FST,
eq. 10, starting from VM-L) and the control (VM-L trained on for as many steps: the same step as VM-L). Each
stage's loss is the project's own (``crd_jax.training.stages.plan_stage``) and the full step is the loop's
(``crd_jax.training.loop.make_train_step``: gradient, global-norm clipping, Adam), so the step column is what
``python train.py`` runs.

The split, per stage, all jitted in one process and timed in alternation (every function twice per round, the
second call timed, as a training loop calls its step back to back; the minimum over rounds: the machine may be
shared):

* forward: the stage's loss function with the registration loss replaced by ``mean(disp^2) / 2`` (the networks
  the stage runs, frozen ones included, the field upsampling of a low-resolution model, the distillation terms);
* backward: the gradient of that function minus its forward;
* loss: the full training step minus the network forward + backward, i.e. the registration loss (warp, NCC,
  grad-L2 at the full resolution, forward and backward) and the optimizer update.

Back to back (``--loop-steps N``, default 20, ``--quick`` 2): after the rounds each stage calls its step N times in
a row (one untimed call first), as the training loop does; their median, mean and slowest, and the pipeline's hours
at the mean, which a run's hours follow (the rounds' minima leave out its slow steps). ``<out>_summary.md``: the
README's lines (:func:`render_summary`).

Against the FMA peak (issue 26): the convolutions' useful multiply-adds of each stage's networks, counted from one
abstract trace of its gradient and the live ones from its forward's jaxpr (:func:`network_flops`: frozen networks
forward only; equal to XLA's cost analysis of the same stages written with ``lax.conv``, less the input gradient
lax computes and discards for a frozen skip's channels, tests/test_train_budget.py),
over the forward and backward seconds, as a fraction of the FMA peak ``cpu_peak.py``'s probe measures in the same
process before the stages run (left out where the probe cannot be built).

``--bf16``: every stage twice, float32 and ``train.bf16`` (the step, its forward and its gradient traced inside
``crd_jax.ops.conv.bf16_training``), timed in the same rounds, so their ratio is measured under the same load; the
process's CPU seconds per call (all threads) are recorded beside the wall-clock seconds, a measure less exposed to
other processes on a shared machine.

PyTorch rows: the paper's VM written in plain PyTorch (``_child.torch_same_arch``, as ``peers.py``), the
low-resolution model as trilinear down/up-sampling around it, NCC 9^3 as separable box sums (1-D convolutions,
the same algorithm as ours), ``grid_sample`` warp, Adam; each in a fresh process with all cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, write  # noqa: E402

#: the 128^3 pipeline in training order; Experiment 2 trains both FST outputs (``model.teacher_output``); S3 here
#: learns from the half-resolution one (with its teacher cached, S3's step does not depend on which)
STAGES = ("vm_h", "vm_l", "coop", "fst", "fst_full", "vm_l_crd", "control")
LABELS = {
    "vm_h": "VM-H",
    "vm_l": "VM-L",
    "coop": "S1 cooperative",
    "fst": "FST teacher (S2)",
    "fst_full": "FST teacher, full-resolution output (S2)",
    "vm_l_crd": "S3 distill (VM-L-CRD)",
    "control": "control (VM-L, continued)",
    "vm_l_crd_cached": "S3 distill, teacher cached (VM-L-CRD)",  # loss_speed.py's name for the cached variant
}


# --- JAX --------------------------------------------------------------------------------------------------


def pipeline_config(shape, shift: int = 1, batch: int = 1, fusion: str = "compact"):
    """The default config (the paper's VM, n = 2^shift) with the six stages of the 128^3 experiment and
    Experiment 2's settings (``configs/lpba40_crd_exp2.py``: the compact FST head, eq. 8 on the full grid)."""
    from crd_jax.config import base_config, stage

    c = base_config()
    c.model.shift = shift
    c.model.fusion = fusion
    c.loss.deformation_grid = "full"
    c.train.batch_size = batch
    c.data.shape = tuple(shape)
    c.stages.fst_full = stage("teacher", backbone="coop", model={"teacher_output": "full"}, label="FST (full)")
    c.stages.control = stage("baseline", resolution="low", init="vm_l", label="VM-L control")
    c.pipeline = STAGES
    return c


@contextlib.contextmanager
def network_only():
    """Within the block the registration loss (warp + L_sim + lambda L_reg) is ``mean(disp^2) / 2``: a stage's
    loss function then costs what its networks cost (the cotangent of ``disp`` is ``disp / size``, data
    dependent, so nothing is folded away)."""
    import jax.numpy as jnp

    from crd_jax import losses

    real = losses.registration_loss

    def proxy(moving, fixed, disp, reg_weight=1.0, window=9, sim=None):
        value = 0.5 * jnp.mean(disp * disp)
        return value, {"sim": value, "reg": jnp.zeros_like(value)}

    losses.registration_loss = proxy
    try:
        yield
    finally:
        losses.registration_loss = real


#: ``--before-after``: the training-path changes of issue 26 off ("before") and on ("after"), each stage compiled
#: both ways and timed in the same rounds
VARIANTS = {
    "before": {"upcat_backward": "concat", "upsample_vjp": "autodiff", "warp_gradient": "xla"},
    "after": {"upcat_backward": "coarse", "upsample_vjp": "native", "warp_gradient": "native"},
}


@contextlib.contextmanager
def ops_variant(name):
    """The ops' backward formulations of variant ``name`` while functions are traced (``None``: leave them)."""
    import importlib

    conv = importlib.import_module("crd_jax.ops.conv")
    spatial = importlib.import_module("crd_jax.ops.spatial")
    if name is None:
        yield
        return
    previous = (conv.upcat_backward(), spatial.upsample_vjp(), spatial.warp_gradient())
    conv.upcat_backward(VARIANTS[name]["upcat_backward"])
    spatial.upsample_vjp(VARIANTS[name]["upsample_vjp"])
    spatial.warp_gradient(VARIANTS[name]["warp_gradient"])
    try:
        yield
    finally:
        conv.upcat_backward(previous[0])
        spatial.upsample_vjp(previous[1])
        spatial.warp_gradient(previous[2])


def _batch(shape, batch, seed=0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    make = lambda: jnp.asarray(rng.random((batch, *shape, 1), np.float32))  # noqa: E731
    return {"moving": make(), "fixed": make()}


def plan_pipeline(config, shape, batch, stages=STAGES):
    """``{stage: StagePlan}`` for every stage, each later stage reading the earlier ones' initial parameters (the
    step's cost does not depend on the values)."""
    import jax

    from crd_jax.training.stages import Trained, plan_stage

    example = {k: jax.device_get(v) for k, v in _batch(shape, batch).items()}
    done, plans = {}, {}
    key = jax.random.PRNGKey(0)
    needed = set(stages)  # the requested stages and those they read (init, backbone, teacher), transitively
    for name in reversed(STAGES):
        if name in needed:
            needed |= {v for v in config.stages[name].values() if isinstance(v, str) and v in STAGES}
    for i, name in enumerate(STAGES):
        if name not in needed:
            continue
        plan = plan_stage(name, config.stages[name], config, done, jax.random.fold_in(key, i), example)
        done[name] = Trained(plan.model, plan.full_params(plan.init_params), plan.spec)
        if name in stages:
            plans[name] = plan
    return plans


def stage_functions(plan, config, steps: int, bf16: bool = False):
    """``{"forward", "network", "step"}``: jitted callables of no arguments (the step carries its own state);
    ``bf16``: the step is ``train.bf16``'s (forward and network are traced in bfloat16 by :class:`StageTimer`)."""
    import jax

    from crd_jax.training import distributed
    from crd_jax.training.loop import make_optimizer, make_train_step

    loss_fn = plan.loss_fn
    with network_only():
        forward = jax.jit(lambda p, fr, b: loss_fn(p, fr, b)[0])
        network = jax.jit(jax.value_and_grad(lambda p, fr, b: loss_fn(p, fr, b)[0]))
    mesh = distributed.data_mesh()
    optimizer = make_optimizer(config.train, steps)
    step = make_train_step(loss_fn, optimizer, mesh, bf16=bf16)
    return forward, network, step, optimizer, mesh


class StageTimer:
    """The three functions of one stage, compiled, with the step's state carried from call to call."""

    def __init__(self, name, plan, config, batch, steps, compiler_options=None, variant=None, bf16=False):
        import importlib

        import jax

        bf16_training = importlib.import_module("crd_jax.ops.conv").bf16_training
        self.name, self.variant, self.bf16 = name, variant, bf16
        opts = compiler_options
        forward, network, step, optimizer, mesh = stage_functions(plan, config, steps, bf16)
        params, frozen = plan.init_params, plan.frozen
        with ops_variant(None if variant == CACHED else variant), bf16_training(bf16):
            with network_only():  # traced (and compiled) inside: the proxy is what they run
                self.forward = forward.lower(params, frozen, batch).compile(opts)
                self.network = network.lower(params, frozen, batch).compile(opts)
            self.state = (jax.tree_util.tree_map(lambda x: x.copy(), params), optimizer.init(params))
            self.step = step.lower(*self.state, frozen, batch).compile(opts)
        self.args = (params, frozen, batch)
        self.flops = network_flops(plan.loss_fn, params, frozen, batch)
        self.times = {"forward": [], "network": [], "step": []}
        self.cpu_times = {"forward": [], "network": [], "step": []}  # process CPU seconds, all threads
        self.loop_times = []  # steps called back to back (run_back_to_back)
        self.parameters = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

    def run(self, what: str, record: bool = True) -> float:
        import jax

        params, frozen, batch = self.args
        t, c = time.perf_counter(), time.process_time()
        if what == "step":
            p, o, metrics = self.step(*self.state, frozen, batch)
            jax.block_until_ready((p, o, metrics))
            self.state = (p, o)
        else:
            jax.block_until_ready(getattr(self, what)(params, frozen, batch))
        dt = time.perf_counter() - t
        if record:
            self.times[what].append(dt)
            self.cpu_times[what].append(time.process_time() - c)
        return dt

    def run_back_to_back(self, steps: int) -> None:
        """``steps`` train steps in a row, each timed, nothing else in between: as a training loop calls them. One
        untimed step first: the first call after other programs maps its buffers afresh (see ``CALLS_PER_ROUND``),
        which a run pays once, not once in every ``steps``."""
        self.run("step", record=False)
        self.loop_times = [self.run("step", record=False) for _ in range(steps)]

    def result(self) -> dict:
        best = {k: min(v) for k, v in self.times.items()}
        cpu = {k: min(v) for k, v in self.cpu_times.items()}
        label = LABELS.get(self.name, self.name) + (f" ({self.variant})" if self.variant else "")
        label += " [bf16]" if self.bf16 else ""
        return {
            "stage": self.name,
            "label": label,
            "variant": self.variant or "",
            "precision": "bf16" if self.bf16 else "float32",
            "forward_cpu_s": cpu["forward"],
            "network_cpu_s": cpu["network"],
            "step_cpu_s": cpu["step"],
            "parameters": self.parameters,
            "forward_s": best["forward"],
            "backward_s": max(best["network"] - best["forward"], 0.0),
            "network_s": best["network"],
            "loss_s": max(best["step"] - best["network"], 0.0),
            "step_s": best["step"],
            "runs": len(self.times["step"]),
            **back_to_back_summary(self.loop_times),
            "forward_gflop": self.flops["forward"] / 1e9,
            "backward_gflop": self.flops["backward"] / 1e9,
        }


def stage_timers(shape, stages, batch: int = 1, seed: int = 1) -> dict:
    """``{stage: StageTimer}`` of the 128^3-pipeline ``stages`` at ``shape`` (Experiment 2's settings), each
    compiled under the process's settings at the call, all on one random batch."""
    config = pipeline_config(shape, batch=batch)
    data = _batch(shape, batch, seed=seed)
    plans = plan_pipeline(config, shape, batch, stages)
    return {st: StageTimer(st, plans[st], config, data, 10_000) for st in stages}


#: calls of each function per round, the last one timed (see :func:`measure_jax`)
CALLS_PER_ROUND = 2

#: train steps per stage called back to back after the rounds (``--loop-steps``; ``--quick``: 2)
LOOP_STEPS = 20


def back_to_back_summary(times) -> dict:
    """Median, mean and slowest of a stage's back-to-back steps (``{}`` when none ran). The mean is what a run's
    throughput follows: the minimum over rounds leaves out the slow steps a long run also pays."""
    if not times:
        return {}
    return {
        "loop_step_times_s": list(times),
        "loop_steps": len(times),
        "loop_step_median_s": statistics.median(times),
        "loop_step_mean_s": statistics.fmean(times),
        "loop_step_max_s": max(times),
    }


#: ``--quick``: XLA's backend optimisation off (a check that everything runs, not a measurement)
QUICK_OPTIONS = {"xla_backend_optimization_level": 0}


#: the variant of S3 whose frozen teacher's outputs come with the batch (crd_jax/training/teacher_cache.py)
CACHED = "teacher cached"
#: ordered training pairs of 24 subjects (LPBA40's training split): the teacher forwards that fill the cache
CACHE_PAIRS = 24 * 23


def cached_teacher_stage(plan, batch_arrays):
    """S3's plan and batch with the teacher read from the batch: the step a run pays once every pair is cached."""
    import dataclasses

    from crd_jax.training.distill import cached_key
    from crd_jax.training.teacher_cache import TeacherCache

    loss_fn = plan.loss_fn
    cache = TeacherCache(loss_fn.teacher.apply, plan.frozen, batch_arrays["moving"], batch_arrays["fixed"])
    leaves = cache.compute(batch_arrays["moving"], batch_arrays["fixed"])  # what the cache stores
    cached_batch = dict(batch_arrays, **{cached_key(i): leaf for i, leaf in enumerate(leaves)})
    return dataclasses.replace(plan, loss_fn=loss_fn.with_cached_teacher(cache.tree, cache.disp_factor)), cached_batch


def measure_jax(
    shape,
    batch,
    repeats,
    steps,
    stages=STAGES,
    log=print,
    compiler_options=None,
    variants=(None,),
    teacher_cache=False,
    fusion="compact",
    precisions=("float32",),
    loop_steps=0,
):
    config = pipeline_config(shape, batch=batch, fusion=fusion)
    batch_arrays = _batch(shape, batch, seed=1)
    plans = plan_pipeline(config, shape, batch, stages)
    timers = []
    jobs = [
        (name, variant, plans[name], batch_arrays, precision == "bf16")
        for name in stages
        for variant in variants
        for precision in precisions
    ]
    if teacher_cache and "vm_l_crd" in stages:
        jobs.append(("vm_l_crd", CACHED, *cached_teacher_stage(plans["vm_l_crd"], batch_arrays), False))
    for name, variant, plan, arrays, bf16 in jobs:
        t = time.perf_counter()
        timers.append(StageTimer(name, plan, config, arrays, steps, compiler_options, variant, bf16))
        for what in ("forward", "network", "step"):  # warm-up, not recorded
            timers[-1].run(what)
            timers[-1].times[what].clear()
            timers[-1].cpu_times[what].clear()
        what = (" " + variant if variant else "") + (" bf16" if bf16 else "")
        log(f"[{name}{what}] compiled and warmed up in {time.perf_counter() - t:.1f} s")
    for r in range(repeats):  # rounds: every stage's three functions in turn
        for timer in timers:
            for what in ("forward", "network", "step"):
                # twice, the second timed: a function called right after a different one maps its buffers afresh
                # and pays the page faults (VM-H's network gradient took 1.0 s instead of 0.5 s after other
                # functions, all of it system time), which a training loop, calling its step back to back, never does
                for _ in range(CALLS_PER_ROUND - 1):
                    timer.run(what, record=False)
                timer.run(what)
        log(
            f"round {r + 1}/{repeats}: "
            + ", ".join(f"{t.name}{' bf16' if t.bf16 else ''} {t.times['step'][-1]:.2f}s" for t in timers)
        )
    for timer in timers if loop_steps > 0 else ():  # after every round: the rounds' minima stay as they were
        timer.run_back_to_back(loop_steps)
        what = (" " + timer.variant if timer.variant else "") + (" bf16" if timer.bf16 else "")
        log(f"[{timer.name}{what}] {loop_steps} steps back to back: mean {sum(timer.loop_times) / loop_steps:.3f} s")
    return [t.result() for t in timers]


# --- PyTorch (written independently, in a fresh process) ---------------------------------------------------


def torch_child(model: str, shape, repeats: int) -> dict:
    """VM-H (``vm_h``) or VM-L (``vm_l``, n = 2) training step in PyTorch: forward, forward + backward of
    ``mean(disp^2) / 2``, and the full step (NCC 9^3 + grad-L2 at the full resolution, backward, Adam)."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from _child import torch_same_arch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    net = torch_same_arch(torch, nn).to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    m = torch.rand((1, 1, *shape), generator=g).to(memory_format=fmt)
    f = torch.rand((1, 1, *shape), generator=g).to(memory_format=fmt)
    n = 2 if model == "vm_l" else 1

    def field(m, f):
        if n == 1:
            return net(m, f)
        small = [F.interpolate(x, scale_factor=1 / n, mode="trilinear", align_corners=False) for x in (m, f)]
        return F.interpolate(net(*small), scale_factor=n, mode="trilinear", align_corners=False) * n

    box = [torch.ones((1, 1, *(9 if a == k else 1 for a in range(3)))) for k in range(3)]

    def box_sum(x):  # separable 9^3 window sum, zeros outside
        for k, kernel in enumerate(box):
            x = F.conv3d(x, kernel, padding=tuple(4 if a == k else 0 for a in range(3)))
        return x

    def ncc(a, b):
        sums = box_sum(torch.cat([a, b, a * a, b * b, a * b], 0))
        a_sum, b_sum, aa, bb, ab = sums[0:1], sums[1:2], sums[2:3], sums[3:4], sums[4:5]
        size = 9.0**3
        a_mean, b_mean = a_sum / size, b_sum / size
        cross = ab - b_mean * a_sum - a_mean * b_sum + a_mean * b_mean * size
        a_var = aa - 2 * a_mean * a_sum + a_mean * a_mean * size
        b_var = bb - 2 * b_mean * b_sum + b_mean * b_mean * size
        return -torch.mean(cross * cross / (a_var * b_var + 1e-5))

    def grad_l2(d):
        return sum(torch.mean(torch.diff(d, dim=k) ** 2) for k in (2, 3, 4)) / 3

    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))[None]

    def warp(image, disp):  # border mode, voxel units, ij order
        loc = grid + disp
        loc = torch.stack([2 * loc[:, i] / (s - 1) - 1 for i, s in enumerate(shape)], -1)[..., [2, 1, 0]]
        return F.grid_sample(image, loc, mode="bilinear", align_corners=True, padding_mode="border")

    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))

    def forward():
        with torch.no_grad():
            field(m, f)

    def network():
        net.zero_grad(set_to_none=True)
        d = field(m, f)
        (0.5 * torch.mean(d * d)).backward()

    def step():
        opt.zero_grad(set_to_none=True)
        d = field(m, f)
        loss = ncc(f, warp(m, d)) + grad_l2(d)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    fns = {"forward": forward, "network": network, "step": step}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = {k: float(np.min(v)) for k, v in times.items()}
    return {
        "stage": model,
        "label": f"{LABELS[model]} (PyTorch {torch.__version__})",
        "framework": "torch",
        "parameters": sum(p.numel() for p in net.parameters()),
        "forward_s": best["forward"],
        "backward_s": max(best["network"] - best["forward"], 0.0),
        "network_s": best["network"],
        "loss_s": max(best["step"] - best["network"], 0.0),
        "step_s": best["step"],
        "runs": repeats,
    }


def run_torch(model, shape, repeats, log=print) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--torch-child",
        model,
        "--shape",
        *map(str, shape),
        "--repeats",
        str(repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        result = {
            "stage": model,
            "label": f"{LABELS[model]} (PyTorch)",
            "framework": "torch",
            "error": (proc.stderr.strip().splitlines() or ["no output"])[-1],
        }
    else:
        result = json.loads(lines[-1][len("RESULT ") :])
    log(json.dumps(result))
    return result


# --- report -----------------------------------------------------------------------------------------------


def hours(step_s: float, steps: int) -> float:
    return step_s * steps / 3600.0


def cache_fill_hours(s3: dict, cached: dict) -> float:
    """The teacher's forward once per training pair: S3's forward less the cached variant's (the student's)."""
    return max(s3["forward_s"] - cached["forward_s"], 0.0) * CACHE_PAIRS / 3600.0


def pipeline_totals(rows, steps: int, seconds: str = "step_s") -> dict:
    """Hours of the pipeline's stages at ``seconds`` per step (a row's key: the minimum ``step_s`` or the
    back-to-back ``loop_step_mean_s``), per total (:func:`_total_key`), and with S3's teacher cached where its
    row was measured (S3's step replaced by the cached one's, plus the teacher forwards that fill the cache)."""
    ok = [r for r in rows if "error" not in r and seconds in r]
    totals = {}
    for r in ok:
        if r.get("variant") != CACHED:
            totals[_total_key(r)] = totals.get(_total_key(r), 0.0) + hours(r[seconds], steps)
    cached = next((r for r in ok if r.get("variant") == CACHED), None)
    s3 = next((r for r in ok if r["stage"] == "vm_l_crd" and _total_key(r) in ("", "after")), None)
    if cached is not None and s3 is not None:
        key = s3.get("variant", "")
        totals[with_cache_key(key)] = (
            totals[key] - hours(s3[seconds], steps) + hours(cached[seconds], steps) + cache_fill_hours(s3, cached)
        )
    return totals


#: how :func:`pipeline_totals` names the total with S3's teacher cached
WITH_CACHE = "with S3's teacher cached"


def with_cache_key(key: str) -> str:
    """The total of ``key``'s stages with S3's step replaced by its teacher-cached one."""
    return f"{key} {WITH_CACHE}".strip()


def render_back_to_back(rows, steps: int) -> list:
    """The steps called back to back after the rounds (``--loop-steps``): minimum over rounds, median, mean and
    slowest, and the hours at the mean (runs before ``--loop-steps`` existed have none: no table)."""
    rows = [r for r in rows if "error" not in r and r.get("loop_steps")]
    if not rows:
        return []
    n = rows[0]["loop_steps"]
    lines = [
        "",
        f"Back to back, as a training loop calls its step: after the rounds, {n} steps of each stage in a row, each "
        "timed. The table above keeps each function's fastest call; a long run also pays its slow steps (XLA's "
        "buffers mapped and zeroed afresh, other processes), so the hours at the mean are what the steps of a "
        f"{steps:,}-step stage take (data loading, logging, checkpoints and evaluation come on top).",
        "",
        f"| Stage | Step, minimum over rounds (s) | Median (s) | Mean (s) | Slowest (s) | Mean / minimum | "
        f"Hours per {steps:,} steps at the mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['step_s']:.3f} | {r['loop_step_median_s']:.3f} | {r['loop_step_mean_s']:.3f} | "
            f"{r['loop_step_max_s']:.3f} | {r['loop_step_mean_s'] / r['step_s']:.2f}x | "
            f"{hours(r['loop_step_mean_s'], steps):.1f} |"
        )
    fastest = pipeline_totals(rows, steps)
    for key, h in pipeline_totals(rows, steps, "loop_step_mean_s").items():
        lines.append(f"| **{total_label(key)}** (at the minima: {fastest[key]:.1f} h) | | | | | | **{h:.1f}** |")
    return lines


def total_label(key: str) -> str:
    """A pipeline total's name in the tables: ``Pipeline``, ``Pipeline, bf16``, ``Pipeline, S3's teacher cached``."""
    cached = key.endswith(WITH_CACHE)
    base = key[: -len(WITH_CACHE)].strip() if cached else key
    return "Pipeline" + (f", {base}" if base else "") + (", S3's teacher cached" if cached else "")


def render_summary(payload: dict) -> str:
    """A few lines for the README from a run's JSON (``<out>_summary.md``, written beside the tables when the run
    timed steps back to back): the pipeline's hours at the fastest and at the mean step, and the steps' ratios to
    the networks' forward (float32; of a ``--before-after`` run, the "after" rows). Empty for runs without
    back-to-back steps."""
    rows = [r for r in payload["rows"] if _total_key(r) in ("", "after", CACHED)]
    failed = [r["label"] for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r and "loop_step_mean_s" in r]
    steps, m = payload["steps_per_stage"], payload["machine"]
    at_mean = pipeline_totals(rows, steps, "loop_step_mean_s")
    if not at_mean:
        return ""
    fastest = pipeline_totals(rows, steps)
    key = next(k for k in at_mean if not k.endswith(WITH_CACHE))
    stages = [r for r in rows if r.get("variant") != CACHED]
    ratios = [r["step_s"] / r["forward_s"] for r in rows]
    over = [r["label"] for r in rows if r["step_s"] / r["forward_s"] > 3.5]
    size = "x".join(map(str, payload["shape"]))
    text = (
        f"*Training at {size}, n = 2, batch {payload['batch']}, on {m.get('cpu', m.get('processor', ''))}, "
        f"{m['cpus']} cores* (`benchmarks/train_budget.py`{', ' + key if key else ''}, {steps:,} steps for each of "
        f"{len(stages)} stage{'s' if len(stages) != 1 else ''}"
        + (f"; failed, so not counted: {', '.join(failed)}" if failed else "")
        + f"): **{fastest[key]:.1f} h** at each stage's fastest step, **{at_mean[key]:.1f} h** at the mean of "
        f"{rows[0]['loop_steps']} steps called back to back"
    )
    cached = with_cache_key(key)
    if cached in at_mean:
        text += f" ({fastest[cached]:.1f} h and {at_mean[cached]:.1f} h with S3's teacher cached)"
    text += f"; a step costs {min(ratios):.1f}-{max(ratios):.1f}x its networks' forward"
    text += f" (above 3.5x: {', '.join(over)})." if over else "."
    return text + "\n"


def write_results(out: Path, payload: dict) -> None:
    """The run's JSON and tables, and its README summary where it has one (:func:`render_summary`)."""
    write(out, payload, render(payload))
    summary, path = render_summary(payload), out.with_name(out.name + "_summary.md")
    if summary:
        path.write_text(summary)
    else:  # a summary left by an earlier run into the same --out would describe other tables
        path.unlink(missing_ok=True)


def render_peak(rows, peak: float) -> list:
    """The networks' convolutions against the FMA peak: GFLOP/s of the forward and of the backward."""
    rows = [r for r in rows if "error" not in r and r.get("forward_gflop")]
    if not rows or not peak:
        return []
    lines = [
        "",
        f"The networks against this machine's FMA peak ({peak:.0f} GFLOP/s: `cpu_peak.py`'s probe in this process, "
        "on this run's CPU; other tables' peaks were measured on other CPUs): the useful multiply-adds of the "
        "convolutions that run, counted as direct 3^3 convolutions (2 FLOPs each; frozen networks forward only, "
        "weight gradients of the trained ones, input gradients where a derivative flows; the count equals XLA's cost "
        "analysis of the same stage written with lax.conv, less the input gradient lax computes and discards for a "
        "frozen skip's channels), over the forward and backward columns' seconds. So % "
        "of peak is direct-convolution-equivalent throughput, not how busy the FMA units were: the Winograd layers "
        "and the decoder's coarse backward do fewer multiply-adds than counted, and everything else the networks do "
        "(activations, upsampling, concatenation, the distillation terms) is in the seconds but not in the count.",
        "",
        "| Stage | Forward GFLOP | Forward GFLOP/s | % of peak | Backward GFLOP | Backward GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f_rate = r["forward_gflop"] / r["forward_s"] if r["forward_s"] else 0.0
        b_rate = r["backward_gflop"] / r["backward_s"] if r["backward_s"] else 0.0
        lines.append(
            f"| {r['label']} | {r['forward_gflop']:.1f} | {f_rate:.0f} | {f_rate / peak:.0%} | "
            f"{r['backward_gflop']:.1f} | {b_rate:.0f} | {b_rate / peak:.0%} |"
        )
    return lines


def render(payload: dict) -> str:
    """The tables of a run from its JSON (``--render`` rebuilds them): seconds per step split into forward,
    backward and loss, the networks' and the whole step's ratio to the forward, the projected hours."""
    rows, torch_rows, m = payload["rows"], payload["torch_rows"], payload["machine"]
    shape, batch, steps, repeats = payload["shape"], payload["batch"], payload["steps_per_stage"], payload["repeats"]
    conv, peak = payload["conv"], payload.get("fma_peak_gflops", 0.0)
    size = "x".join(map(str, shape))
    # runs before the FST head was an option recorded no setting (nor ran Experiment 2's)
    settings = (
        f", FST head `{payload['fusion']}`, eq. 8 on the full grid (Experiment 2's settings)" if "fusion" in payload else ""
    )
    lines = [
        f"Training budget at {size}, n = 2, batch {batch}{settings}; {m.get('cpu', m.get('processor', ''))}, {m['cpus']} "
        f"cores; crd-jax convolution: {conv}. Seconds per step, minimum of {repeats} rounds in which every "
        + (
            f"function ran {payload['calls_per_round']} times in turn, the last call timed"
            if payload.get("calls_per_round", 1) > 1  # older runs timed every function's one call per round
            else "function ran once in turn"
        )
        + " (one process); forward and backward: the stage's networks; loss: "
        "the full step minus the networks' forward + backward (warp, NCC 9^3, grad-L2 at the full resolution, "
        "forward and backward, and Adam). Regenerate: `python benchmarks/train_budget.py"
        + (" --bf16`." if any(r.get("precision") == "bf16" for r in rows) else "`."),
        "",
        f"| Stage | Forward (s) | Backward (s) | Loss (s) | Step (s) | Networks / forward | Step / forward | Loss share "
        f"| Hours per {steps:,} steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total, cached = pipeline_totals(rows, steps), None
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | | |")
            continue
        h = hours(r["step_s"], steps)
        if r.get("variant") == CACHED:
            cached = r
        lines.append(
            f"| {r['label']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['loss_s']:.3f} | "
            f"{r['step_s']:.3f} | {r['network_s'] / r['forward_s']:.1f}x | {r['step_s'] / r['forward_s']:.1f}x | "
            f"{r['loss_s'] / r['step_s']:.0%} | {h:.1f} |"
        )
    for variant, h in total.items():
        if variant.endswith(WITH_CACHE):
            continue
        count = sum(1 for r in rows if _total_key(r) == variant and "error" not in r)
        lines.append(f"| **Pipeline ({count} stages{', ' + variant if variant else ''})** | | | | | | | | **{h:.1f}** |")
    s3 = next((r for r in rows if r["stage"] == "vm_l_crd" and _total_key(r) in ("", "after") and "error" not in r), None)
    if cached is not None and s3 is not None:
        fill = cache_fill_hours(s3, cached)
        with_cache = total[with_cache_key(s3.get("variant", ""))]
        lines.append(
            f"| **Pipeline, S3's teacher cached** (+ {fill:.2f} h: {CACHE_PAIRS} teacher forwards fill the "
            f"cache) | | | | | | | | **{with_cache:.1f}** |"
        )
        lines += [
            "",
            f"S3 with its teacher cached (`train.teacher_cache_gb`, on by default without augmentation): the "
            "frozen teacher runs once per training pair, so after the first "
            f"{CACHE_PAIRS} pairs a step pays the student only; its step is {s3['step_s'] / cached['step_s']:.2f}x "
            "faster than running the teacher every step.",
        ]
    if torch_rows:
        lines += [
            "",
            f"PyTorch, written independently (the paper's VM in plain PyTorch, `channels_last_3d`, all cores; "
            "NCC 9^3 as separable box sums, `grid_sample` warp, Adam), each in a fresh process:",
            "",
            "| Model | Forward (s) | Backward (s) | Loss (s) | Step (s) | PyTorch / crd-jax step |",
            "|---|---|---|---|---|---|",
        ]
        ours = {r["stage"]: r for r in rows if _total_key(r) in ("", "after")}
        for r in torch_rows:
            if "error" in r:
                lines.append(f"| {r['label']} | failed: {r['error']} | | | | |")
                continue
            mine = ours.get(r["stage"])
            ratio = f"{r['step_s'] / mine['step_s']:.2f}x" if mine and "error" not in mine else "-"
            lines.append(
                f"| {r['label']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['loss_s']:.3f} | "
                f"{r['step_s']:.3f} | {ratio} |"
            )
    lines += render_back_to_back(rows, steps)
    lines += render_peak(rows, peak)
    lines += render_bf16(rows, payload.get("bf16_engine", ""), payload.get("winograd_min_input_channels"))
    return "\n".join(lines) + "\n"


def _total_key(row) -> str:
    """The pipeline total a row adds to: its variant, and ``bf16`` for ``train.bf16``'s rows."""
    bf16 = row.get("precision", "float32") == "bf16"
    return (row.get("variant", "") + (" bf16" if bf16 else "")).strip()


def bf16_pairs(rows):
    """``[(float32 row, bf16 row)]``: the same stage and variant in both precisions (``--bf16``)."""
    ok = [r for r in rows if "error" not in r]
    f32 = {(r["stage"], r.get("variant", "")): r for r in ok if r.get("precision", "float32") == "float32"}
    return [
        (f32[(r["stage"], r.get("variant", ""))], r)
        for r in ok
        if r.get("precision") == "bf16" and (r["stage"], r.get("variant", "")) in f32
    ]


def render_bf16(rows, engine: str, winograd_min_channels=None) -> list:
    """The ``--bf16`` table: bfloat16 / float32 seconds per step, forward and backward, wall clock and CPU;
    ``engine`` and ``winograd_min_channels``: the run's bf16 engine and Winograd input-channel threshold (runs
    before the threshold existed recorded none: every such layer ran Winograd)."""
    pairs = bf16_pairs(rows)
    if not pairs:
        return []
    threshold = f" and at least {winograd_min_channels} input channels" if winograd_min_channels else ""
    lines = [
        "",
        f"bfloat16 training (`train.bf16`, {engine or 'no bf16 engine'}) against float32, timed in the "
        "same rounds: ratios under 1 mean bfloat16 is faster. CPU: the process's CPU seconds per call (all threads; "
        "the minimum over rounds), less exposed than wall clock to other processes on a shared machine. In float32, "
        f"stride-1 3^3 layers with 16k output channels{threshold} run Winograd F(2x2x2, 3x3x3) (64 instead of 216 multiply-adds "
        "per 8 outputs); the bfloat16 kernels are direct convolutions (twice the multiply-adds per instruction on "
        "AVX512-BF16), so they take those layers off Winograd.",
        "",
        "| Stage | float32 step (s) | bf16 step (s) | Step bf16 / float32 | Forward bf16 / float32 | "
        "Backward bf16 / float32 | float32 step CPU (s) | bf16 step CPU (s) | CPU bf16 / float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        back = b["backward_s"] / a["backward_s"] if a["backward_s"] > 0 else float("nan")
        lines.append(
            f"| {a['label']} | {a['step_s']:.3f} | {b['step_s']:.3f} | {b['step_s'] / a['step_s']:.2f} | "
            f"{b['forward_s'] / a['forward_s']:.2f} | {back:.2f} | {a.get('step_cpu_s', float('nan')):.2f} | "
            f"{b.get('step_cpu_s', float('nan')):.2f} | {b.get('step_cpu_s', 0) / a.get('step_cpu_s', float('nan')):.2f} |"
        )
    return lines


# --- profile: where a step's time goes --------------------------------------------------------------------


#: the name of the jitted call that wraps convolution ``i`` in a :func:`recording_layers` trace with ``mark``
MARK = "crd_budget_conv_"


@contextlib.contextmanager
def recording_layers(calls: list, mark: bool = False):
    """Within the block every convolution a model runs (``crd_jax.models.layers``' ``conv`` and fused
    ``conv_upsampled_concat``) is appended to ``calls`` with its shapes and whether its weights and inputs carry a
    derivative of the traced gradient (``"trained"``, ``"d_inputs"``: channels of the input that do). ``mark``: each
    runs inside a ``jax.jit`` named ``MARK + index``, so that a jaxpr of the trace says which of them are live."""
    import jax

    from crd_jax.models import layers

    real_conv, real_upcat = layers.conv, layers.conv_upsampled_concat

    def differentiated(a) -> bool:  # a tracer of jax.grad's linearisation: depends on the trained parameters
        return type(a).__name__ in ("LinearizeTracer", "JVPTracer")

    def marked(fn):
        if not mark:
            return fn

        def call(*args, **kwargs):
            return fn(*args, **kwargs)

        call.__name__ = f"{MARK}{len(calls) - 1}"
        return jax.jit(call, static_argnames=tuple(kwargs_names))

    kwargs_names = ("stride", "padding", "negative_slope")

    def conv(x, w, b, stride=1, padding=None, negative_slope=None):
        calls.append(
            {
                "op": "conv",
                "x": tuple(x.shape),
                "w": tuple(w.shape),
                "stride": stride,
                "slope": negative_slope,
                "trained": differentiated(w),
                "d_inputs": x.shape[-1] if differentiated(x) else 0,
            }
        )
        return marked(real_conv)(x, w, b, stride=stride, padding=padding, negative_slope=negative_slope)

    def upcat(low, skip, w, b, negative_slope=None):
        calls.append(
            {
                "op": "upcat",
                "low": tuple(low.shape),
                "skip": tuple(skip.shape),
                "w": tuple(w.shape),
                "slope": negative_slope,
                "trained": differentiated(w),
                "d_inputs": (low.shape[-1] if differentiated(low) else 0) + (skip.shape[-1] if differentiated(skip) else 0),
                "d_skip": differentiated(skip),
            }
        )
        return marked(real_upcat)(low, skip, w, b, negative_slope=negative_slope)

    layers.conv, layers.conv_upsampled_concat = conv, upcat
    try:
        yield calls
    finally:
        layers.conv, layers.conv_upsampled_concat = real_conv, real_upcat


def record_layers(model, shape, batch):
    """The convolutions ``model.apply`` runs, in order, with their shapes (an abstract trace)."""
    import jax

    from crd_jax.compile import shapes_only

    calls = []
    with recording_layers(calls):
        data = _batch(shape, batch)
        with shapes_only():  # parameter shapes from a trace, nothing compiled
            params = model.init(jax.random.PRNGKey(0), data["moving"], data["fixed"])
        calls.clear()  # the initialisation's trace ran the same layers
        jax.eval_shape(lambda p: model.apply(p, data["moving"], data["fixed"]).disp, params)
    return calls


def _valid_taps(n: int, k: int, stride: int, low: int) -> int:
    """Sum over the outputs of one axis of the taps that land inside the input (``n`` voxels, ``k`` taps, zero
    padding ``low`` before it): what a convolution multiplies usefully along that axis."""
    out = (n + 2 * low - k) // stride + 1
    return sum(sum(1 for t in range(k) if 0 <= o * stride - low + t < n) for o in range(out))


def layer_flops(call) -> float:
    """Multiply-adds x 2 of one recorded convolution, the useful ones (taps on the zero padding left out, as XLA's
    cost analysis counts them), as a direct convolution: the Winograd layers multiply less."""
    import numpy as np

    kernel = call["w"][:-2]
    if call["op"] == "upcat":  # stride 1 on the skip's grid
        spatial, strides, batch = call["skip"][1:-1], (1,) * len(kernel), call["skip"][0]
    else:
        s = call["stride"]
        spatial, batch = call["x"][1:-1], call["x"][0]
        strides = (s,) * len(kernel) if isinstance(s, int) else tuple(s)
    taps = np.prod([_valid_taps(n, k, st, k // 2) for n, k, st in zip(spatial, kernel, strides)])
    return 2.0 * float(batch) * float(taps) * float(call["w"][-2]) * float(call["w"][-1])


def _marked_calls(jaxpr) -> set:
    """Indices of the :data:`MARK` calls in a jaxpr, sub-jaxprs included."""
    from jax.extend import core as jex_core

    found = set()
    for eqn in jaxpr.eqns:
        name = str(eqn.params.get("name", ""))
        if name.startswith(MARK):
            found.add(int(name[len(MARK) :]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    found |= _marked_calls(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    found |= _marked_calls(sub)
    return found


def live_convolutions(loss_fn, params, frozen, batch) -> set:
    """Indices (in trace order) of the convolutions a stage's loss runs that reach its value: a frozen network's
    outputs that nothing reads (the FST's backbone flow heads and full-resolution decoder level) are traced but
    removed by XLA as dead code, so they are not counted (dead-code elimination of the forward's jaxpr)."""
    import jax
    from jax._src.interpreters import partial_eval as pe

    with network_only(), recording_layers([], mark=True):
        closed = jax.make_jaxpr(lambda p: loss_fn(p, frozen, batch)[0])(params)
    live, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return _marked_calls(live)


def network_flops(loss_fn, params, frozen, batch) -> dict:
    """The convolution FLOPs (:func:`layer_flops`) of a stage's networks: ``forward`` every live convolution its loss
    runs (:func:`live_convolutions`; frozen networks included), ``backward`` the weight gradients of the trained
    ones and the input gradients of the inputs that carry a derivative (from one abstract trace of the gradient,
    under :func:`network_only`)."""
    import jax

    calls = []
    with network_only(), recording_layers(calls):
        jax.eval_shape(jax.grad(lambda p: loss_fn(p, frozen, batch)[0]), params)
    live = live_convolutions(loss_fn, params, frozen, batch)
    calls = [c for i, c in enumerate(calls) if i in live]
    forward = sum(layer_flops(c) for c in calls)
    backward = 0.0
    for c in calls:
        channels = c["w"][-2]
        backward += layer_flops(c) * ((1.0 if c["trained"] else 0.0) + c["d_inputs"] / channels)
    return {"forward": forward, "backward": backward, "convolutions": len(calls)}


def _layer_name(call) -> str:
    w = call["w"]
    if call["op"] == "upcat":
        return (
            f"up({'x'.join(map(str, call['low'][1:-1]))}) ++ skip {'x'.join(map(str, call['skip'][1:-1]))}, "
            f"{call['low'][-1]}+{call['skip'][-1]} -> {w[-1]}"
        )
    s = call["stride"]
    stride = s if isinstance(s, int) else max(s)
    return f"conv {'x'.join(map(str, call['x'][1:-1]))}, {w[-2]} -> {w[-1]}" + (", stride 2" if stride == 2 else "")


def layer_functions(call):
    """``{"forward", "input grad", "weight grad", "forward + backward"}`` of one recorded layer, on random
    arguments: jitted functions and their arguments. Input grad: every input the layer differentiates in
    training (the first layer's input and the level-0 skip are the image pair: no gradient)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crd_jax.ops.conv import conv, conv_upsampled_concat

    rng = np.random.default_rng(0)
    arr = lambda s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
    slope = call["slope"]
    w = arr(call["w"]) * 0.1
    b = arr(call["w"][-1:])
    if call["op"] == "conv":
        x = arr(call["x"])
        stride = call["stride"]
        op = lambda x, w, b: conv(x, w, b, stride=stride, negative_slope=slope)  # noqa: E731
        ins = (x,)
        data_input = call["x"][-1] == 2  # the image pair
        grad_inputs = () if data_input else (0,)
    else:
        low, skip = arr(call["low"]), arr(call["skip"])
        op = lambda low, skip, w, b: conv_upsampled_concat(low, skip, w, b, negative_slope=slope)  # noqa: E731
        ins = (low, skip)
        grad_inputs = (0,) if call["skip"][-1] == 2 else (0, 1)
    y = jax.jit(op)(*ins, w, b)
    cot = arr(y.shape)
    k = len(ins)

    def vjp_of(argnums):
        def f(*args):
            diff = [args[i] for i in argnums]

            def g(*d):
                full = list(args[:-1])
                for i, v in zip(argnums, d):
                    full[i] = v
                return op(*full)

            return jax.vjp(g, *diff)[1](args[-1])

        return jax.jit(f)

    out = {"forward": (jax.jit(op), (*ins, w, b))}
    if grad_inputs:
        out["input grad"] = (vjp_of(grad_inputs), (*ins, w, b, cot))
    out["weight grad"] = (vjp_of((k, k + 1)), (*ins, w, b, cot))
    out["forward + backward"] = (vjp_of(grad_inputs + (k, k + 1)), (*ins, w, b, cot))
    return out


def loss_functions(shape, factor, batch):
    """The full-resolution loss of a step, by piece: forward and forward + backward (gradient with respect to
    the field, as training takes it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crd_jax.losses import grad_l2, ncc, registration_loss
    from crd_jax.ops.spatial import upsample_field, warp

    rng = np.random.default_rng(0)
    arr = lambda s, scale=1.0: jnp.asarray(scale * rng.standard_normal(s).astype(np.float32))  # noqa: E731
    m, f = (jnp.asarray(rng.random((batch, *shape, 1), np.float32)) for _ in range(2))
    d = arr((batch, *shape, 3), 2.0)
    g1 = arr((batch, *shape, 1))
    grad = lambda fn, argnums=0: jax.jit(jax.grad(fn, argnums=argnums))  # noqa: E731
    out = {
        "warp (trilinear, border), forward": (jax.jit(lambda m, d: warp(m, d)), (m, d)),
        "warp, forward + backward (field)": (grad(lambda d, m, g: jnp.sum(warp(m, d) * g)), (d, m, g1)),
        "NCC 9^3, forward": (jax.jit(ncc), (f, m)),
        "NCC 9^3, forward + backward (warped image)": (grad(lambda w, f: ncc(f, w)), (m, f)),
        "grad-L2, forward + backward": (grad(grad_l2), (d,)),
        "registration loss (warp + NCC + grad-L2), forward + backward": (
            grad(lambda d, m, f: registration_loss(m, f, d)[0]),
            (d, m, f),
        ),
    }
    if factor > 1:
        low = arr((batch, *(s // factor for s in shape), 3))
        out["field upsampling x2 (VM-L), forward"] = (jax.jit(lambda x: upsample_field(x, factor)), (low,))
        out["field upsampling x2 (VM-L), forward + backward"] = (
            grad(lambda x, r: jnp.sum(upsample_field(x, factor) * r)),
            (low, d),
        )
    return out


def hlo_census(shape, batch):
    """What the compiled VM-L and VM-H training steps are made of: native custom calls by target, and the XLA
    operations that matter for speed (convolutions would be lax fallbacks; gathers, scatters, reduce-windows)."""
    import collections
    import re

    import jax

    config = pipeline_config(shape, batch=batch)
    plans = plan_pipeline(config, shape, batch, ("vm_h", "vm_l"))
    data = _batch(shape, batch)
    out = {}
    for name, plan in plans.items():
        fn = jax.jit(jax.value_and_grad(lambda p, fr, b: plan.loss_fn(p, fr, b)[0]))
        text = fn.lower(plan.init_params, plan.frozen, data).compile().as_text()
        targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
        ops = collections.Counter(re.findall(r"= \S+ ([a-z][\w-]*)\(", text))
        out[name] = {
            "custom_calls": dict(targets),
            "xla": {k: ops.get(k, 0) for k in ("convolution", "gather", "scatter", "reduce-window", "dot", "sort")},
        }
    return out


def _alternating(named, repeats, log):
    """``{name: min seconds}`` of jitted ``(fn, args)`` pairs, each called once per round, in turn."""
    import jax

    compiled = {}
    for name, (fn, args) in named.items():
        compiled[name] = (fn.lower(*args).compile(), args)
        jax.block_until_ready(compiled[name][0](*args))
    times = {name: [] for name in named}
    for _ in range(repeats):
        for name, (fn, args) in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    log(f"  timed {len(named)} functions x {repeats} rounds")
    return {k: min(v) for k, v in times.items()}


def profile(shape, batch, repeats, log=print) -> dict:
    """The attribution's measurements (``render_profile`` writes them as tables)."""
    from crd_jax.models import build as mbuild
    from crd_jax.ops import native

    config = pipeline_config(shape, batch=batch)
    arch = mbuild.architecture(config.model)
    step_rows = measure_jax(shape, batch, repeats, 10_000, ("vm_h", "vm_l"), log)
    payload = {
        "shape": list(shape),
        "batch": batch,
        "repeats": repeats,
        "conv": native.describe(),
        "steps": step_rows,
        "models": {},
        "loss": {},
        "machine": machine(),
    }
    for factor, label in ((2, "VM-L (network at half size)"), (1, "VM-H")):
        model = mbuild.registrar_from_config(arch, factor)
        calls = record_layers(model, shape, batch)
        named = {}
        for i, call in enumerate(calls):
            for kind, fa in layer_functions(call).items():
                named[(i, kind)] = fa
        log(f"{label}: {len(calls)} layers")
        best = _alternating(named, repeats, log)
        payload["models"][label] = [
            {
                "layer": _layer_name(call),
                **{
                    kind: best[(i, kind)]
                    for kind in ("forward", "input grad", "weight grad", "forward + backward")
                    if (i, kind) in best
                },
            }
            for i, call in enumerate(calls)
        ]
    payload["loss"] = _alternating(loss_functions(shape, 2, batch), repeats, log)
    payload["hlo"] = hlo_census(shape, batch)
    return payload


def render_profile(payload) -> str:
    """The attribution tables from :func:`profile`'s measurements (``--render-profile FILE.json`` rebuilds them).
    Each gradient column is its function's time minus the layer's forward (a VJP runs the forward first)."""
    shape, m = "x".join(map(str, payload["shape"])), payload.get("machine", {})
    md = [
        f"Where a training step's time goes at {shape}, batch {payload['batch']} ({m.get('cpu', '')}, {m.get('cpus', '?')} "
        f"cores; {payload['conv']}). Each row is a separately jitted function on random arguments of the layer's "
        f"shapes, minimum of {payload['repeats']} rounds in which every function of the table ran once in turn. "
        "Regenerate: `python benchmarks/train_budget.py --profile`.",
        "",
        "Whole steps (the stage's own loss and train step, as `train_budget.py`; the loss column is the step minus "
        "the networks' forward + backward, so on a loaded machine it can come out as 0):",
        "",
        "| Stage | Forward (s) | Backward (s) | Loss (s) | Step (s) |",
        "|---|---|---|---|---|",
    ]
    for r in payload["steps"]:
        md.append(f"| {r['label']} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | {r['loss_s']:.3f} | {r['step_s']:.3f} |")
    for label, rows in payload["models"].items():
        md += [
            "",
            f"{label}, convolutions (ms). Input grad: the gradient with respect to every input training "
            "differentiates (the image pair has none: `-`); weight grad: with respect to kernel and bias; "
            "backward: all of them; each minus the forward:",
            "",
            "| Layer | Forward | Input grad | Weight grad | Backward | Backward / forward |",
            "|---|---|---|---|---|---|",
        ]
        tot = {"forward": 0.0, "input grad": 0.0, "weight grad": 0.0, "backward": 0.0}
        for r in rows:
            f = r["forward"]
            net = {"forward": f, "weight grad": max(r["weight grad"] - f, 0.0), "backward": max(r["forward + backward"] - f, 0.0)}
            if "input grad" in r:
                net["input grad"] = max(r["input grad"] - f, 0.0)
            for k, v in net.items():
                tot[k] += v
            ig = f"{net['input grad'] * 1e3:.1f}" if "input grad" in net else "-"
            md.append(
                f"| {r['layer']} | {f * 1e3:.1f} | {ig} | {net['weight grad'] * 1e3:.1f} | "
                f"{net['backward'] * 1e3:.1f} | {net['backward'] / max(f, 1e-9):.1f}x |"
            )
        md.append(
            f"| **sum** | **{tot['forward'] * 1e3:.0f}** | {tot['input grad'] * 1e3:.0f} | {tot['weight grad'] * 1e3:.0f} "
            f"| **{tot['backward'] * 1e3:.0f}** | {tot['backward'] / max(tot['forward'], 1e-9):.1f}x |"
        )
    md += [
        "",
        f"Full-resolution loss pieces at {shape} (ms; gradients with respect to the field or the warped image, "
        "as training takes them):",
        "",
        "| Piece | ms |",
        "|---|---|",
    ]
    md += [f"| {k} | {v * 1e3:.1f} |" for k, v in payload["loss"].items()]
    md += [
        "",
        "The compiled gradient of the VM-H and VM-L losses (`jax.jit(...).lower().compile().as_text()`): native "
        "custom calls by target, and XLA operations that matter (a `convolution` would be a lax fallback):",
        "",
        "| Stage | Native custom calls | XLA convolution | gather | scatter | reduce-window |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in payload["hlo"].items():
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(c["custom_calls"].items()))
        x = c["xla"]
        md.append(f"| {LABELS[name]} | {calls} | {x['convolution']} | {x['gather']} | {x['scatter']} | {x['reduce-window']} |")
    return "\n".join(md) + "\n"


# --- main -------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=None, help="full-resolution size (default 128^3; --quick 32^3)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 5; --quick 1)")
    p.add_argument("--steps", type=int, default=10_000, help="steps per stage for the projected hours")
    p.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    p.add_argument("--quick", action="store_true", help="32^3, one round, no PyTorch: a check that it runs")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--before-after",
        action="store_true",
        help="every stage twice, with the backward formulations "
        "of issue 26 off (before: concatenated decoder input, autodiff upsampling, XLA's warp) and on (after)",
    )
    p.add_argument(
        "--fusion",
        default="compact",
        choices=("compact", "paper", "official"),
        help="the FST head (model.fusion; Experiment 2: compact)",
    )
    p.add_argument(
        "--teacher-cache",
        action="store_true",
        help="also S3 with its frozen teacher's outputs cached (train.teacher_cache_gb), and the pipeline's hours with it",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="every stage in float32 and with train.bf16, timed in the same rounds -> results/train_budget_bf16",
    )
    p.add_argument("--torch-repeats", type=int, default=None)
    p.add_argument(
        "--loop-steps",
        type=int,
        default=None,
        help=f"train steps per stage called back to back after the rounds (default {LOOP_STEPS}; --quick 2; 0: none)",
    )
    p.add_argument("--profile", action="store_true", help="the attribution tables -> results/train_profile.{md,json}")
    p.add_argument("--render", type=Path, metavar="JSON", help="rebuild a run's tables from its JSON")
    p.add_argument("--render-profile", type=Path, metavar="JSON", help="rebuild the profile's tables from its JSON")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--torch-child", choices=("vm_h", "vm_l"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = tuple(args.shape or ((32, 32, 32) if args.quick else (128, 128, 128)))
    repeats = args.repeats or (1 if args.quick else 5)
    if args.torch_child:
        print("RESULT " + json.dumps(torch_child(args.torch_child, shape, repeats)), flush=True)
        return 0
    if args.render_profile:
        payload = json.loads(args.render_profile.read_text())
        write(args.out or args.render_profile.with_suffix(""), payload, render_profile(payload))
        return 0
    if args.render:
        payload = json.loads(args.render.read_text())
        write_results(args.out or args.render.with_suffix(""), payload)
        return 0
    if args.profile:
        payload = profile(shape, args.batch, repeats)
        write(args.out or HERE / "results" / "train_profile", payload, render_profile(payload))
        return 0
    from crd_jax.ops import native

    if args.bf16 and not native.has_bf16():
        print("error: --bf16: this CPU has neither AVX512-BF16 nor AMX (or the native kernel is off)", file=sys.stderr)
        return 2
    conv = native.describe()
    from cpu_peak import fma_peak_gflops

    try:  # before the stages: quiet
        probe = fma_peak_gflops(**({"seconds": 0.05, "tries": 1} if args.quick else {}))
        peak = max(probe["all_threads"], probe["one_thread_x_threads"])
    except (Exception, SystemExit) as exc:  # no C++ compiler, not x86-64 Linux: the table without its peak columns
        print(f"no FMA peak probe ({exc}): the table against the peak is left out")
        probe, peak = None, 0.0
    t = time.perf_counter()
    rows = measure_jax(
        shape,
        args.batch,
        repeats,
        args.steps,
        tuple(args.stages),
        compiler_options=QUICK_OPTIONS if args.quick else None,
        variants=("before", "after") if args.before_after else (None,),
        teacher_cache=args.teacher_cache,
        fusion=args.fusion,
        precisions=("float32", "bf16") if args.bf16 else ("float32",),
        loop_steps=args.loop_steps if args.loop_steps is not None else (2 if args.quick else LOOP_STEPS),
    )
    print(f"measured in {time.perf_counter() - t:.0f} s")
    torch_rows = []
    if not (args.quick or args.no_torch):
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch is not installed (pip install -e '.[peers]'): no PyTorch rows")
        else:
            for model in ("vm_h", "vm_l"):
                torch_rows.append(run_torch(model, shape, args.torch_repeats or repeats))
    payload = {
        "machine": machine(),
        "conv": conv,
        "fma_peak": probe,
        "fma_peak_gflops": peak,
        "shape": list(shape),
        "batch": args.batch,
        "repeats": repeats,
        "calls_per_round": CALLS_PER_ROUND,
        "fusion": args.fusion,
        "steps_per_stage": args.steps,
        "rows": rows,
        "torch_rows": torch_rows,
        "pipeline_hours": pipeline_totals(rows, args.steps),
        "pipeline_hours_back_to_back": pipeline_totals(rows, args.steps, "loop_step_mean_s"),
        "bf16_ratios": [
            {
                "stage": a["stage"],
                "variant": a.get("variant", ""),
                "step": b["step_s"] / a["step_s"],
                "forward": b["forward_s"] / a["forward_s"],
                "step_cpu": b["step_cpu_s"] / a["step_cpu_s"],
            }
            for a, b in bf16_pairs(rows)
        ],
        "bf16_engine": native.describe_bf16(),
        "winograd_min_input_channels": native.winograd_min_input_channels(),
    }
    write_results(args.out or HERE / "results" / ("train_budget_bf16" if args.bf16 else "train_budget"), payload)
    return 0


if __name__ == "__main__":
    from crd_jax.allocator import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc((__file__,))  # training steps as train.py runs them (crd_jax/allocator.py)
    sys.exit(main())
