"""Does bfloat16 training (``train.bf16``) reach the Dice of float32 training? Issue 26, item 4.

    python benchmarks/bf16_training.py --data-root /path/to/lpba40     # four runs + evaluation; resumable
    python benchmarks/bf16_training.py --report                        # the results files from what finished

PROTOCOL (written before any run of this script; not to be changed after results)

Stage: VM-H (``baseline``, resolution high: every convolution at the full grid, where bfloat16 has the most
layers to change) on LPBA40 as in ``configs/lpba40_vm_3d_ll.py`` (volumes resampled to 64x80x64, lr 1e-3 halved at
60% and 80% of the stage, batch 1, NCC 9^3 + grad-L2 with lambda 1) on a 64x96x64 canvas (the smallest a 4-level VM
takes with ``model.shift = 1``; the config's 64x128x64 serves its n = 4 models), trained from scratch for ``STEPS``
= 800 steps (the CPU budget: four runs and their evaluations within ~40 minutes on 2 shared cores; not tuned on
validation Dice).

Runs: seeds 0 and 1 (``config.seed``: the initial parameters and the order of the training pairs), each in float32
and with ``train.bf16 = True``; nothing else differs. Each run is ``python train.py`` in its own process and
workdir (re-running the script resumes the runs that did not finish).

Evaluation: the stage's own evaluation (float32 inference in both precisions) on all 30 ordered validation pairs
(S35-S40), Dice over the 56 LPBA40 labels on the 64x80x64 grid.

Reported: per run, the mean Dice over the 30 pairs; per seed, d_s = Dice(bf16) - Dice(float32) (the mean over pairs
of the paired difference) and the mean of d_s over the two seeds; the per-pair paired differences (mean of the two
seeds' differences per pair: mean, SD, 95% t-interval over the 30 pairs, descriptive only since pairs share
subjects); and, as the yardstick of noise, the same quantities for float32 seed 1 - float32 seed 0 (and bf16 seed 1 -
bf16 seed 0).

Verdict, fixed in advance: bf16 is "within noise" of float32 if |mean of d_s| <= |float32 seed 1 - seed 0| (the mean
Dice difference two float32 seeds show) AND the SD over pairs of the bf16 - float32 differences is no larger than
that of the float32 seed-to-seed differences. Otherwise the report says it is not shown to be within noise. Two
seeds make a small sample: this is a check for a gross effect, not a proof of equivalence.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

STEPS = 800
SEEDS = (0, 1)
PRECISIONS = ("float32", "bf16")
STAGE = "vm_h"  # the config's full-resolution baseline block
CONFIG = ROOT / "configs" / "lpba40_vm_3d_ll.py"
DEFAULT_WORKDIR = ROOT / "runs" / "bf16_training"  # runs/ is not tracked


def run_name(precision: str, seed: int) -> str:
    return f"{precision}_s{seed}"


def train_command(workdir: Path, data_root: str, precision: str, seed: int, steps: int) -> list:
    """``python train.py`` for one run, with the overrides as a user types them."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={CONFIG}",
        f"--config.workdir={workdir / run_name(precision, seed)}",
        f"--config.data.root={data_root}",
        f"--config.pipeline=('{STAGE}',)",
        "--config.model.shift=1",  # the canvas multiple: 2^(4 levels + 1) = 32
        "--config.data.shape=(64,96,64)",
        f"--config.stages.{STAGE}.steps={steps}",
        f"--config.stages.{STAGE}.label=VM-H ({precision}, seed {seed})",
        f"--config.seed={seed}",
        f"--config.train.bf16={precision == 'bf16'}",
        "--config.train.eval_every=0",
        "--config.train.progress_bar=False",
        "--config.eval.hd95=False",
        "--config.eval.timing_repeats=1",
    ]


def per_pair(workdir: Path, precision: str, seed: int):
    """``{(moving, fixed): dice}`` of a finished run, else None."""
    path = workdir / run_name(precision, seed) / "stages" / STAGE / "eval.json"
    if not path.exists():
        return None
    return {(r["moving"], r["fixed"]): float(r["dice"]) for r in json.loads(path.read_text())["pairs"]}


def paired(a: dict, b: dict) -> dict:
    """``a - b`` pair by pair: the mean, and the SD and 95% t-interval over pairs (descriptive)."""
    import numpy as np

    from crd_stats import t_interval

    if set(a) != set(b):
        raise ValueError("the runs were evaluated on different pairs")
    diffs = [a[k] - b[k] for k in sorted(a)]
    t = t_interval(diffs)
    return {"mean": float(np.mean(diffs)), "sd": t["sd"], "low": t["low"], "high": t["high"], "pairs": len(diffs)}


def mean_of(d: dict) -> float:
    return float(sum(d.values()) / len(d))


def analyse(tables: dict) -> dict:
    """The protocol's quantities from ``{(precision, seed): per-pair Dice}`` (all four runs)."""
    runs = {run_name(p, s): mean_of(tables[p, s]) for p in PRECISIONS for s in SEEDS}
    d = {str(s): paired(tables["bf16", s], tables["float32", s]) for s in SEEDS}
    pair_mean = {k: sum(tables["bf16", s][k] - tables["float32", s][k] for s in SEEDS) / len(SEEDS) for k in tables["float32", 0]}
    zero = {k: 0.0 for k in pair_mean}
    seed32 = paired(tables["float32", 1], tables["float32", 0])
    seed16 = paired(tables["bf16", 1], tables["bf16", 0])
    mean_d = float(sum(v["mean"] for v in d.values()) / len(d))
    # the verdict uses the per-seed differences' SD over pairs (one training run each side, as seed32's)
    sd_d = max(v["sd"] for v in d.values())
    within = abs(mean_d) <= abs(seed32["mean"]) and sd_d <= seed32["sd"]
    return {
        "runs": runs,
        "bf16_minus_float32": d,
        "mean_bf16_minus_float32": mean_d,
        "pairs_bf16_minus_float32": paired(pair_mean, zero),
        "float32_seed1_minus_seed0": seed32,
        "bf16_seed1_minus_seed0": seed16,
        "within_noise": bool(within),
    }


def render(result: dict, meta: dict) -> str:
    a = result["analysis"]
    lines = [
        f"### bfloat16 training vs float32: VM-H on LPBA40 (64x80x64), {meta['steps']} steps, seeds {', '.join(map(str, SEEDS))}",
        "",
        f"{meta['machine']}; bf16 engine {meta['bf16_engine']}. Validation Dice: mean over the 30 ordered pairs of "
        "S35-S40 (56 labels), float32 inference for every run. Protocol: `benchmarks/bf16_training.py` (docstring, "
        "written before the runs). Regenerate: `python benchmarks/bf16_training.py --data-root <lpba40>`.",
        "",
        "| Seed | float32 Dice | bf16 Dice | bf16 - float32 | SD over pairs "
        "| Wall s per run, train + evaluation (float32 / bf16) |",
        "|---|---|---|---|---|---|",
    ]
    for s in SEEDS:
        d = a["bf16_minus_float32"][str(s)]
        secs = [meta["train_seconds"].get(run_name(p, s)) for p in PRECISIONS]
        secs_text = " / ".join("-" if x is None else f"{x:.0f}" for x in secs)
        lines.append(
            f"| {s} | {a['runs'][run_name('float32', s)]:.4f} | {a['runs'][run_name('bf16', s)]:.4f} | {d['mean']:+.4f} | "
            f"{d['sd']:.4f} | {secs_text} |"
        )
    p, s32, s16 = a["pairs_bf16_minus_float32"], a["float32_seed1_minus_seed0"], a["bf16_seed1_minus_seed0"]
    lines += [
        "",
        "| Paired comparison over the 30 pairs | Mean | SD | 95% t-interval (descriptive) |",
        "|---|---|---|---|",
        f"| bf16 - float32 (per pair, mean of the two seeds) | {p['mean']:+.4f} | {p['sd']:.4f} | "
        f"[{p['low']:+.4f}, {p['high']:+.4f}] |",
        f"| float32 seed 1 - seed 0 (the noise yardstick) | {s32['mean']:+.4f} | {s32['sd']:.4f} | "
        f"[{s32['low']:+.4f}, {s32['high']:+.4f}] |",
        f"| bf16 seed 1 - seed 0 | {s16['mean']:+.4f} | {s16['sd']:.4f} | [{s16['low']:+.4f}, {s16['high']:+.4f}] |",
        "",
        f"Mean over seeds of bf16 - float32: {a['mean_bf16_minus_float32']:+.4f}; float32 seed-to-seed: "
        f"{s32['mean']:+.4f}. Verdict (the protocol's rule): "
        + (
            "**within noise**: the bf16 - float32 difference is no larger than two float32 seeds' difference, in the "
            "mean and in its spread over pairs."
            if a["within_noise"]
            else "**not shown to be within noise** by the protocol's rule (see the numbers above)."
        ),
        "",
        "Two seeds and a short run: a check for a gross effect of bfloat16 on what training reaches, not a proof of "
        "equivalence; the pairs share subjects, so the t-intervals over pairs are descriptive.",
    ]
    return "\n".join(lines) + "\n"


def report(workdir: Path, out: Path, steps: int, train_seconds: dict) -> dict | None:
    from common import machine, write

    from crd_jax.ops import native

    tables = {(p, s): per_pair(workdir, p, s) for p in PRECISIONS for s in SEEDS}
    missing = [run_name(*k) for k, v in tables.items() if v is None]
    if missing:
        print(f"not finished: {', '.join(missing)}; no report")
        return None
    m = machine()
    meta = {
        "steps": steps,
        "machine": f"{m.get('cpu', m.get('processor', ''))}, {m['cpus']} cores",
        "bf16_engine": native.describe_bf16() or "none",
        "train_seconds": train_seconds,
    }
    result = {
        "protocol": __doc__.split("PROTOCOL")[1].strip(),
        **meta,
        "machine_info": m,
        "per_pair": {run_name(*k): {f"{a}->{b}": v for (a, b), v in t.items()} for k, t in tables.items()},
        "analysis": analyse(tables),
    }
    write(out, result, render(result, meta))
    print(render(result, meta))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("CRD_JAX_LPBA40", "/work/shared/data/lpba40"))
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="the four runs' folders (resumable)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"steps per run (the protocol: {STEPS})")
    p.add_argument("--report", action="store_true", help="only write the results files from finished runs")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bf16_training")
    args = p.parse_args(argv)
    timings_path = args.workdir / "train_seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    if not args.report:
        from crd_jax.ops import native

        if not native.has_bf16():
            print("error: this CPU has neither AVX512-BF16 nor AMX (or no native kernel): no bf16 runs", file=sys.stderr)
            return 2
        args.workdir.mkdir(parents=True, exist_ok=True)
        for seed in SEEDS:
            for precision in PRECISIONS:  # float32 then bf16 of one seed, so a partial run pairs up early
                name = run_name(precision, seed)
                if per_pair(args.workdir, precision, seed) is not None:
                    print(f"[{name}] finished earlier")
                    continue
                print(f"[{name}] training {args.steps} steps ...", flush=True)
                t = time.perf_counter()
                proc = subprocess.run(train_command(args.workdir, args.data_root, precision, seed, args.steps), cwd=ROOT)
                if proc.returncode != 0:
                    print(f"error: run {name} failed (exit {proc.returncode})", file=sys.stderr)
                    return proc.returncode
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
                timings_path.write_text(json.dumps(timings, indent=1))
    return 0 if report(args.workdir, args.out, args.steps, timings) is not None else 1


if __name__ == "__main__":
    from crd_jax.allocator import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc((__file__,))  # training steps as train.py runs them (crd_jax/allocator.py)
    sys.exit(main())
