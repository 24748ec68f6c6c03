"""One generic training loop for every stage.

A stage supplies a pure ``loss_fn(params, frozen, batch) -> (loss, aux)``. The loop jits one train step
from it: the batch is split over the ``data`` axis of the device mesh (``shard_map``), each device takes
the gradient of its share, gradients and metrics are averaged across devices (``pmean``), and Adam
updates the replicated parameters. ``frozen`` is an argument of the step that is never differentiated
and has no optimizer state: freezing is structural.

Resume: the stage's checkpoints hold ``{params, opt_state, step}``; training pairs are a pure function of
the step (see :mod:`crd_jax.data.pairs`), so a restarted stage continues with the same data order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional

import jax
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from crd_jax.training import distributed
from crd_jax.training.checkpoint import StageCheckpointer
from crd_jax.training.logging import MetricLogger

if TYPE_CHECKING:
    import ml_collections

    from crd_jax.data.loader import PairLoader
    from crd_jax.training.teacher_cache import CachedTeacherLoader

LossFn = Callable[[Any, Any, Dict[str, jax.Array]], Any]


def make_optimizer(train_cfg: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    """Adam (beta1 0.9, beta2 0.99) at ``lr``, multiplied by ``lr_decay_factor`` at each fraction of
    ``lr_decay_at`` of the stage's steps (the paper: 1e-4, halved at 3e5 and 4e5 of 5e5, Section IV-B-2),
    after clipping the gradient's global norm to ``grad_clip`` when it is positive (the authors' code: 1.0)."""
    boundaries = {}
    for fraction in train_cfg.lr_decay_at:
        b = int(round(float(fraction) * steps))
        if 0 < b < steps:
            boundaries[b] = boundaries.get(b, 1.0) * float(train_cfg.lr_decay_factor)
    schedule = optax.piecewise_constant_schedule(float(train_cfg.lr), boundaries)
    adam = optax.adam(schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2))
    clip = float(train_cfg.get("grad_clip", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, bf16: bool = False) -> Callable:
    """The jitted step ``(params, opt_state, frozen, batch) -> (params, opt_state, metrics)``. ``bf16``
    (``config.train.bf16``): the loss and its gradient are traced inside :func:`crd_jax.ops.conv.bf16_training`,
    so the convolutions' forward passes and input gradients round to bfloat16 with float32 sums; the weight
    gradients, the loss, the parameters and Adam's state stay float32 (the caller checks the CPU first:
    :func:`crd_jax.training.config_checks.check_bf16_training`)."""
    from crd_jax.ops.conv import bf16_training

    def per_device(params, opt_state, frozen, batch):
        with bf16_training(bf16):  # read while this function is traced, i.e. inside jit: this step only
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
        grads = jax.lax.pmean(grads, distributed.DATA)
        metrics = jax.lax.pmean({"loss": loss, **aux}, distributed.DATA)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    step = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(distributed.DATA)),
        out_specs=(P(), P(), P()),
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=(0, 1))


class DeadlineReached(Exception):
    """``config.train.deadline`` (a Unix time) passed: the stage saved a checkpoint of ``step`` and stopped;
    re-running resumes there (time-boxed runs on a lent machine, ``benchmarks/gpu_science.py``)."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"stage {stage}: deadline reached after step {step}; checkpoint saved")
        self.stage, self.step = stage, step


@dataclasses.dataclass
class StageRun:
    """What a stage needs from the pipeline to train."""

    name: str
    loss_fn: LossFn
    init_params: Any
    frozen: Any
    steps: int
    directory: Path
    validate: Optional[Callable[[Any], Dict[str, float]]] = None  # params -> metrics on held-out pairs


_pending_signals: list = []


@contextlib.contextmanager
def step_boundaries() -> Iterator[None]:
    """Within the block, SIGINT (Ctrl-C) and SIGTERM wait for the end of the running train step (a
    ``KeyboardInterrupt`` raised inside XLA's or Orbax's callbacks ended in a segmentation fault); a second
    signal does not wait. :func:`check_interrupt` raises the held one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hold(signum, frame):
        if _pending_signals:
            _raise_for(signum)
        _pending_signals.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending_signals.clear()


def _raise_for(signum: int):
    from crd_jax.outputs import Terminated

    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def check_interrupt() -> None:
    """Raises ``KeyboardInterrupt`` (SIGINT) or :class:`crd_jax.outputs.Terminated` (SIGTERM) held by
    :func:`step_boundaries`."""
    if _pending_signals:
        _raise_for(_pending_signals[0])


@jax.jit
def _first_non_finite(first, loss, step):
    """The first step whose loss is NaN/Inf (-1 while there is none), tracked on the device without a sync."""
    return jax.numpy.where((first < 0) & ~jax.numpy.isfinite(loss), step, first)


def _stop_if_non_finite(first, name: str, last_saved: int) -> None:
    from crd_jax.errors import InputError

    bad = int(first)
    if bad >= 0:
        kept = f"the last checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was saved"
        raise InputError(
            f"stage {name}",
            f"the loss became NaN/Inf at step {bad}; training stopped, {kept} (lower config.train.lr, or check the data)",
        )


def _debug_kill(step: int) -> None:
    """Test hook: ``CRD_JAX_DEBUG_KILL_AFTER_STEP=N`` SIGKILLs the process after step N (no cleanup)."""
    target = os.environ.get("CRD_JAX_DEBUG_KILL_AFTER_STEP")
    if target and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def train_stage(
    run: StageRun, loader: PairLoader | CachedTeacherLoader, mesh: Mesh, cfg: ml_collections.ConfigDict, logger: MetricLogger
) -> Any:
    """Trains one stage to ``run.steps`` steps (resuming from its latest checkpoint); returns host params."""
    tc = cfg.train
    optimizer = make_optimizer(tc, run.steps)
    ckpt = StageCheckpointer(run.directory / "ckpt", keep=int(tc.keep_checkpoints))
    state = {"params": run.init_params, "opt_state": optimizer.init(run.init_params), "step": np.int64(0)}
    start, restored = ckpt.restore_latest(like=state, sharding=distributed.replicated(mesh), warn=logger.info)
    if start:
        state = restored
        logger.forget_after(run.name, start)
        logger.info(f"[{run.name}] resuming from step {start}")
    t_start = time.perf_counter()
    params = distributed.replicate(mesh, state["params"])
    opt_state = distributed.replicate(mesh, state["opt_state"])
    frozen = distributed.replicate(mesh, run.frozen)
    bf16 = bool(tc.get("bf16", False))
    if bf16:
        from crd_jax.ops import native

        logger.info(
            f"[{run.name}] bfloat16 training ({native.describe_bf16()}): convolutions' forward passes and input "
            "gradients in bfloat16 with float32 sums; weight gradients, loss, parameters and Adam in float32"
        )
    step_fn = make_train_step(run.loss_fn, optimizer, mesh, bf16=bf16)

    log_every, ckpt_every = max(1, int(tc.log_every)), max(1, int(tc.checkpoint_every))
    eval_every = int(tc.eval_every)
    deadline = float(tc.get("deadline", 0.0) or 0.0)
    bar = logger.progress(run.name, start, run.steps)
    t_last, n_last = time.perf_counter(), 0
    first_bad, last_saved = jax.numpy.int32(-1), start
    with step_boundaries():
        for step, local in loader.iterate(start, run.steps, prefetch=int(cfg.data.prefetch)):
            batch = distributed.global_batch(mesh, local)
            params, opt_state, metrics = step_fn(params, opt_state, frozen, batch)
            done = step + 1
            n_last += 1
            first_bad = _first_non_finite(first_bad, metrics["loss"], done)
            if done % log_every == 0 or done == run.steps:
                _stop_if_non_finite(first_bad, run.name, last_saved)
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["steps_per_s"] = n_last / max(now - t_last, 1e-9)
                t_last, n_last = now, 0
                logger.scalars(run.name, done, values)
                bar.update(done, values)
            if done % ckpt_every == 0 or done == run.steps:
                _stop_if_non_finite(first_bad, run.name, last_saved)  # never a checkpoint of NaN parameters
                ckpt.save(done, {"params": params, "opt_state": opt_state, "step": np.int64(done)})
                last_saved = done
            if run.validate is not None and eval_every > 0 and (done % eval_every == 0 or done == run.steps):
                logger.scalars(run.name, done, run.validate(distributed.to_host(params)), prefix="val/")
            _debug_kill(done)
            out_of_time = deadline > 0 and time.time() >= deadline
            if _pending_signals or out_of_time:
                # a scheduler's preemption (SIGTERM), Ctrl-C or the run's deadline: keep this step's state
                if last_saved != done:
                    _stop_if_non_finite(first_bad, run.name, last_saved)
                    ckpt.save(done, {"params": params, "opt_state": opt_state, "step": np.int64(done)})
                    last_saved = done
                check_interrupt()
                if out_of_time and done < run.steps:
                    bar.close()
                    ckpt.close()
                    raise DeadlineReached(run.name, done)
        _stop_if_non_finite(first_bad, run.name, last_saved)
    bar.close()
    ckpt.close()
    ran = run.steps - start
    logger.info(
        f"[{run.name}] ran steps {start + 1}-{run.steps} ({ran} steps) in {time.perf_counter() - t_start:.0f} s"
        if ran
        else f"[{run.name}] all {run.steps} steps were done before"
    )
    return distributed.to_host(params)
