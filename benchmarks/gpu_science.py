"""Experiment 2 (``configs/lpba40_crd_exp2.py``, 128^3, n = 2) on a lent GPU, time-boxed and resumable
across lends; ``benchmarks/gpu_science.sh`` is the command to run there (it installs the carried wheels).

1. Times one train step of every stage kind of the pipeline (fresh parameters; compile time apart) within
   the first ``--timing-budget`` seconds.
2. Restores the run folder an earlier lend returned (``--state``/state.tar.gz*) and runs the experiment's
   driver (``benchmarks/crd_experiment.py``: teacher phase, gate, students) with ``config.train.deadline``
   30 s before ``--limit``: the running stage saves its step and stops cleanly.
3. Writes under ``--out`` (at most 8 files): ``gpu_science.json`` (timings, steps per second and progress of
   every stage, validation Dice of finished stages, the gate), the run folder as ``state.tar.gz`` (split in
   15 MB parts when larger; parameters, optimizer state, evaluations, no TensorBoard), the log's tail and
   the experiment's report when it was made. Copy the state parts into ``.gpu_science/state/`` (git-ignored,
   carried) for the next lend.

``--small``: the same path on CPU with 30 synthetic 32^3 subjects and a few steps per stage (the dry run).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

PART = 15 * 2**20
STOP_MARGIN_S = 30.0


def time_steps(config, budget_s: float) -> dict:
    """Seconds per train step of each stage kind with fresh parameters (compile excluded), until the budget."""
    import jax

    from crd_jax.data import PairLoader, build_datasets
    from crd_jax.training import distributed
    from crd_jax.training.loop import make_optimizer, make_train_step
    from crd_jax.training.pipeline import network_multiple
    from crd_jax.training.stages import Trained, plan_stage

    t0 = time.time()
    datasets = build_datasets(config.data, network_multiple(config))
    example = PairLoader(datasets["train"], 1, seed=0).batch(0)
    mesh = distributed.data_mesh()
    kinds = {
        "vm_h": "VM-H",
        "vm_l": "VM-L",
        "coop": "S1",
        "fst_half": "FST (half)",
        "fst_full": "FST (full)",
        "crd_paper_s0": "S3 (paper)",
        "crd_code_s0": "S3 (code)",
        "ctl_s0": "control",
    }
    done, out = {}, {}
    for name, label in kinds.items():
        if time.time() - t0 > budget_s:
            out[label] = {"skipped": "timing budget spent"}
            continue
        plan = plan_stage(name, config.stages[name], config, done, jax.random.PRNGKey(0), example)
        done[name] = Trained(plan.model, plan.full_params(plan.init_params), plan.spec)
        optimizer = make_optimizer(config.train, 10)
        step = make_train_step(plan.loss_fn, optimizer, mesh)
        params = distributed.replicate(mesh, plan.init_params)
        state = distributed.replicate(mesh, optimizer.init(plan.init_params))
        frozen = distributed.replicate(mesh, plan.frozen)
        batch = distributed.global_batch(mesh, example)
        c0 = time.perf_counter()
        params, state, m = step(params, state, frozen, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - c0
        times = []
        for _ in range(3):
            s0 = time.perf_counter()
            params, state, m = step(params, state, frozen, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - s0)
        out[label] = {"step_s": min(times), "first_step_s": compile_s}
    return out


def restore(state_dir: Path, workdir: Path) -> bool:
    """The run folder from ``state_dir``'s archive parts (whatever is in ``workdir`` goes first)."""
    shutil.rmtree(workdir, ignore_errors=True)
    parts = sorted(state_dir.glob("state.tar.gz*")) if state_dir.is_dir() else []
    if not parts:
        return False
    workdir.parent.mkdir(parents=True, exist_ok=True)
    joined = workdir.parent / "state.tar.gz"
    with open(joined, "wb") as fh:
        for part in parts:
            fh.write(part.read_bytes())
    with tarfile.open(joined) as tar:
        tar.extractall(workdir.parent, filter="data")
    joined.unlink()
    return True


def pack(workdir: Path, out: Path) -> list:
    """The run folder (no TensorBoard, no staging leftovers) as state.tar.gz, in parts under 16 MiB."""
    archive = out / "state.tar.gz"

    def keep(info):
        return None if "/tensorboard" in info.name or "/." in info.name else info

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(workdir, arcname=workdir.name, filter=keep)
    if archive.stat().st_size <= PART:
        return [archive.name]
    data, names = archive.read_bytes(), []
    archive.unlink()
    for i in range(0, len(data), PART):
        name = f"state.tar.gz.{i // PART:02d}"
        (out / name).write_bytes(data[i : i + PART])
        names.append(name)
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=float, default=540.0, help="wall seconds this call may use in all")
    p.add_argument("--data", type=Path, default=ROOT / ".gpu_science" / "data")
    p.add_argument("--state", type=Path, default=ROOT / ".gpu_science" / "state")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timing-budget", type=float, default=60.0)
    p.add_argument("--small", action="store_true", help="CPU dry run: synthetic 32^3 data, a few steps per stage")
    p.add_argument("--small-steps", type=int, default=6, help="with --small: steps per stage (default 6)")
    args = p.parse_args()
    start = time.time()
    deadline = start + args.limit - STOP_MARGIN_S
    args.out.mkdir(parents=True, exist_ok=True)

    import jax

    import crd_experiment
    from crd_jax.training.loop import DeadlineReached

    crd_experiment.select(2)
    if not (args.data / "images").is_dir():
        raise SystemExit(
            f"{args.data}: no prepared data (python benchmarks/gpu_science_data.py{' --small' if args.small else ''})"
        )
    work = Path(tempfile.mkdtemp(prefix="crd_gpu_science_")) / "run"
    # what a call keeps goes into $OUT (pack); the run folder goes when the process ends, or every call (and every
    # dry run of the tests) would leave its checkpoints in the temporary folder
    atexit.register(shutil.rmtree, work.parent, ignore_errors=True)
    resumed = restore(args.state, work)
    run_args = crd_experiment.parser().parse_args([])
    # one data path on every machine: the run folder remembers its config, and a moved data root is a change
    stable = Path(tempfile.gettempdir()) / ("crd_gpu_science_small" if args.small else "crd_gpu_science_data")
    if stable.is_symlink() or stable.exists():
        stable.unlink()
    stable.symlink_to(args.data.resolve(), target_is_directory=True)
    run_args.workdir, run_args.data_root, run_args.out, run_args.draws = work, str(stable), args.out, 2000
    # on the GPU the teacher's forward costs less than reading its cached outputs from disk
    run_args.overrides = [
        "data.resample_shape=()",
        f"train.deadline={deadline}",
        "train.progress_bar=False",
        "train.teacher_cache_disk_gb=0",
    ]
    if args.small:
        run_args.steps, run_args.max_pairs = args.small_steps, 2
        run_args.overrides += ["data.shape=(32,32,32)", "data.labels=auto", "train.checkpoint_every=100", "train.log_every=10"]
    report = {
        "started": start,
        "limit_s": args.limit,
        "resumed": resumed,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "small": args.small,
    }
    config = crd_experiment._config(run_args, "fst_half")
    try:
        # the timings take at most half of what is left before the deadline, so a short call still times its first
        # stage and still trains
        left = max(0.0, deadline - time.time())
        report["step_timings"] = time_steps(config, min(args.timing_budget, left / 2))
    except Exception as exc:  # a timing failure must not cost the lend's training
        report["step_timings"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    report["timing_s"] = time.time() - start
    try:
        report["gate"] = crd_experiment.run(run_args)
        report["finished"] = True
    except DeadlineReached as exc:
        report["stopped"] = str(exc)
        report["stopped_at"] = {"stage": exc.stage, "step": exc.step}
        report["finished"] = False
    from run_status import read_progress

    report["progress"] = read_progress(work / "metrics.jsonl")
    report["evaluated"] = {
        s.name: {k: v for k, v in json.loads((s / "eval.json").read_text()).items() if k != "pairs"}
        for s in sorted((work / "stages").glob("*"))
        if (s / "eval.json").exists()
    }
    if (work / "gate.json").exists():
        crd_experiment.report(work, args.out, 2000)
    report["wall_s"] = time.time() - start
    report["state_files"] = pack(work, args.out)
    (args.out / "gpu_science.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: report[k] for k in ("resumed", "finished", "wall_s", "state_files")}, default=str))


if __name__ == "__main__":
    main()
