"""glibc's malloc with and without transparent huge pages, and with large freed blocks kept: seconds, page faults,
system time and resident size per training step.

    python benchmarks/huge_page_malloc.py                       # 128^3, n = 2: VM-L, S1, S3 (teacher cached), A vs B
    python benchmarks/huge_page_malloc.py --compare B C --stages vm_l --steps 100   # + blocks kept (-> malloc_keep)
    python benchmarks/huge_page_malloc.py --compare B C --stages vm_h coop fst_full --rounds 2 --steps 60 \
        --out benchmarks/results/malloc_keep_high_res                                # the full-resolution stages
    python benchmarks/huge_page_malloc.py --shape 32 32 32 --rounds 1 --steps 3 --out /tmp/hp   # a check that it runs
    python benchmarks/huge_page_malloc.py --render benchmarks/results/huge_page_malloc.json    # the table again

XLA's CPU runtime takes each call's temporary buffer from malloc (over 100 MB for a 128^3 VM-L train step); a block
that large is mapped afresh and unmapped on free, so every step faults it in again 4 KB at a time. ``train.py``
and ``crd-jax finetune`` re-execute themselves with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(:func:`crd_jax.allocator.reexec_with_huge_page_malloc`), under which malloc advises ``MADV_HUGEPAGE`` on what
it maps and the kernel fills it in 2 MB pages. This script measures both ways: each stage's train step (the
loop's, ``make_train_step``) in fresh processes, ``GLIBC_TUNABLES`` unset (A) and set (B) in turn, A B A B, the
ratio taken pair by pair; each process times ``--steps`` steps after three warm-up steps and reports their
median and mean, its minor page faults, system and user CPU seconds per step and its peak resident size
(``getrusage``). ``--compare B C`` puts B against C, B with three more tunables (every thread on the main heap:
a thread's own heap holds at most 64 MB and maps a larger block on its own; no block mapped on its own; the heap
never trimmed), under which the step's large blocks are allocated once and reused instead of mapped, zeroed by
the kernel and unmapped every step: tried for the training commands and not kept (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_budget as tb  # noqa: E402
from common import machine, write  # noqa: E402

STAGES = ("vm_l", "coop", "vm_l_crd_cached")
#: ``--stages`` may also name any other stage of ``train_budget.py``
CHOICES = STAGES + tuple(s for s in tb.STAGES if s not in STAGES)
#: GLIBC_TUNABLES of each configuration (B: crd_jax/allocator.py's, written out: the children must not depend on
#: the module under test to set their own allocator) and how the table names it
CONFIGS = {
    "A": None,
    "B": "glibc.malloc.hugetlb=1",
    "C": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295",
}
NAMES = {"A": "glibc's defaults", "B": "huge pages", "C": "huge pages + large freed blocks kept in the heap"}
#: results file of each comparison
OUTPUTS = {("A", "B"): "huge_page_malloc", ("B", "C"): "malloc_keep"}


def child(stage: str, shape, steps: int) -> dict:
    """One stage's train step, timed in this process."""
    import jax

    config = tb.pipeline_config(shape)
    batch = tb._batch(shape, 1, seed=1)
    name = "vm_l_crd" if stage == "vm_l_crd_cached" else stage
    plan = tb.plan_pipeline(config, shape, 1, (name,))[name]
    if stage == "vm_l_crd_cached":
        plan, batch = tb.cached_teacher_stage(plan, batch)
    *_, step, optimizer, _ = tb.stage_functions(plan, config, 10_000)
    state = (plan.init_params, optimizer.init(plan.init_params))
    compiled = step.lower(*state, plan.frozen, batch).compile()

    def one(state):
        p, o, m = compiled(*state, plan.frozen, batch)
        jax.block_until_ready((p, o, m))
        return p, o

    for _ in range(3):
        state = one(state)
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        state = one(state)
        times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
        "user_s_per_step": (after.ru_utime - before.ru_utime) / steps,
        "max_rss_mb": after.ru_maxrss / 1024,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def run_child(stage: str, shape, steps: int, tunables) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    cmd = [sys.executable, __file__, "--child", stage, "--shape", *map(str, shape), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"error: {stage} ({tunables or 'default'}) failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _ratios(xs, ys, key):
    """Pair-by-pair ratios of ``key``: their median, and their range where there are several pairs."""
    r = [x[key] / y[key] for x, y in zip(xs, ys)]
    return f"{statistics.median(r):.2f}" + (f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else "")


def render(payload: dict) -> str:
    m = payload["machine"]
    shape = "x".join(map(str, payload["shape"]))
    x, y = payload.get("compare", ["A", "B"])
    lines = [
        f"glibc malloc, {x} ({NAMES[x]}) against {y} ({NAMES[y]}), one train step at {shape}, batch 1 "
        f"({m.get('cpu', '')}, {m['cpus']} cores, THP `{payload['thp']}`, glibc {payload['glibc']}; "
        f"{payload['rounds']} {x}/{y} pairs of fresh processes, {payload['steps']} steps each; medians over the pairs; "
        f"the mean step is what a run's throughput follows, the median what a typical step takes):",
        "",
        f"| stage | median step {x} (s) | median step {y} (s) | {x}/{y} medians (pairs) | mean step {x} (s) | mean step {y} (s)"
        f" | {x}/{y} means (pairs) | faults/step {x} | faults/step {y} | system s/step {x} | system s/step {y}"
        f" | peak RSS {x} (MB) | peak RSS {y} (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, runs in payload["stages"].items():
        a, b = runs[x], runs[y]
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        lines.append(
            f"| {tb.LABELS.get(stage, stage)} | {med(a, 'median_s'):.3f} | {med(b, 'median_s'):.3f} | {_ratios(a, b, 'median_s')}"
            f" | {med(a, 'mean_s'):.3f} | {med(b, 'mean_s'):.3f} | {_ratios(a, b, 'mean_s')}"
            f" | {med(a, 'faults_per_step'):,.0f} | {med(b, 'faults_per_step'):,.0f} | {med(a, 'sys_s_per_step'):.3f}"
            f" | {med(b, 'sys_s_per_step'):.3f} | {med(a, 'max_rss_mb'):,.0f} | {med(b, 'max_rss_mb'):,.0f} |"
        )
    lines += ["", "Command: `" + payload["command"] + "`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--stages", nargs="*", default=list(STAGES), choices=CHOICES)
    p.add_argument("--rounds", type=int, default=3, help="A/B pairs of processes per stage")
    p.add_argument("--steps", type=int, default=15, help="timed steps per process")
    p.add_argument(
        "--compare",
        nargs=2,
        default=["A", "B"],
        choices=sorted(CONFIGS),
        metavar=("X", "Y"),
        help="two configurations: A (glibc's defaults), B (huge pages), C (B + blocks kept)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: results/huge_page_malloc (A B), malloc_keep (B C)")
    p.add_argument("--render", type=Path, metavar="JSON", help="rebuild the table from a results JSON (no measuring)")
    p.add_argument("--child", choices=CHOICES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    if args.render:
        payload = json.loads(args.render.read_text())
        write(args.render.with_suffix(""), payload, render(payload))
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args.child, shape, args.steps)), flush=True)
        return 0
    from crd_jax.allocator import glibc_version, thp_mode

    pair = tuple(args.compare)
    if pair[0] == pair[1]:
        p.error("--compare: two different configurations")
    stages = {}
    for stage in args.stages:
        runs = {key: [] for key in pair}
        for r in range(args.rounds):
            for key in pair:
                runs[key].append(run_child(stage, shape, args.steps, CONFIGS[key]))
                print(f"[{stage}] round {r + 1} {key}: {json.dumps(runs[key][-1])}", flush=True)
        stages[stage] = runs
    glibc = glibc_version()
    payload = {
        "machine": machine(),
        "shape": list(shape),
        "compare": list(pair),
        "rounds": args.rounds,
        "steps": args.steps,
        "thp": thp_mode(),
        "glibc": ".".join(map(str, glibc)) if glibc else "none",
        "stages": stages,
        "command": " ".join(["python benchmarks/huge_page_malloc.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    out = args.out or HERE / "results" / OUTPUTS.get(pair, f"malloc_{pair[0]}_{pair[1]}")
    write(out, payload, render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
