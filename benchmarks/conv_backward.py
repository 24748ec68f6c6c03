"""The convolutions' backward pass before and after the blocked weight-gradient kernel, per layer and per whole
training step, measured in ONE process that alternates the two kernels (the machine may be shared: every
function runs once per round under each kernel in turn, each kernel first in every other round, and the minimum
over rounds is kept).

    python benchmarks/conv_backward.py                       # VM-H and VM-L at 128^3: layers and steps
    python benchmarks/conv_backward.py --quick               # 32^3, 2 rounds (a check that it runs)
    python benchmarks/conv_backward.py --no-steps            # the layer tables only
    python benchmarks/conv_backward.py --render benchmarks/results/conv_backward.json   # tables from the JSON
    python benchmarks/conv_backward.py --compare blocked winograd --no-steps   # any two kernels as old and new

"old" is the weight gradient's earlier kernel (``CRD_JAX_WGRAD=rows``: AVX2, output channels in vectors of 8, one
kw tap at a time), "new" the blocked kernel (``csrc/wgrad_blocked.h``) at the width the process runs (AVX-512 where
the CPU has it); ``crd_jax.ops.native.set_wgrad`` switches between them at run time, so each function is compiled
once. ``--compare OLD NEW`` names the two (any of ``native.set_wgrad``'s: rows, blocked, winograd, auto).
Per layer (the layers ``model.apply`` runs, recorded as ``train_budget.py --profile`` does): the forward,
and the native weight-gradient calls of the layer's backward pass, timed on their own (a layer's gradient with
respect to its kernel minus its forward would hide them: XLA drops the forward where nothing needs its output).
GFLOP/s: the multiply-adds those calls execute (for the decoder's fused step: the coarse-grid correlation of the
upsampled channels, ``(k + 1)^3`` taps on the coarse grid, plus the skip's ``k^3``: ``upcat_backward("coarse_split")``'s
calls; the default ``"coarse"`` makes one Winograd call for both where it applies, timed by ``upcat_backward.py``),
x 2, over their time; % of
peak: over the larger of the FMA peak ``cpu_peak.py`` measures in the same process (all threads, the widest
vectors; the best of three tries before and after: a shared machine) and the peak stored for this CPU in
``results/cpu_peak.json`` (so the column follows that file when the tables are rendered again).
GFLOP per CPU-second: the same operations over the process CPU time of the fastest call (all threads together),
and its % of ONE core's peak (the FMA peak over the threads): what a core does while it runs the kernel, whatever
the machine's other work left to the process. On a shared machine the wall-clock % understates the large layers:
a call of half a second cannot dodge a neighbour's load, where the fastest of twenty 2-ms calls finds moments with
every core free.
Whole steps: ``train_budget.py``'s stage timers
(forward, network forward + backward, full step) under each kernel in turn.

Writes ``results/conv_backward.{md,json}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import train_budget
from common import HERE, machine, write
from cpu_peak import fma_peak_gflops, recorded_peak

KERNELS = ("old", "new")
_SETTING = {"old": "rows", "new": "blocked"}  # --compare replaces them


def use(kernel: str) -> None:
    from crd_jax.ops import native

    native.set_wgrad(_SETTING[kernel])


def wgrad_calls(call):
    """The native weight-gradient calls the backward pass of one recorded layer makes, as one jitted function and
    its (random) arguments, and their floating-point operations: a convolution's ``_weight_grad``; for the decoder's
    fused step (``conv_upsampled_concat``) the split weight gradients of ``upcat_backward("coarse_split")``: the
    stride-2 correlation on the coarse grid that gives the upsampled channels' (``(k + 1)^3`` taps, as
    ``_coarse_upsampled_grads``) and the skip's. (The default ``"coarse"`` replaces both by one Winograd pass where
    it applies: ``benchmarks/upcat_backward.py`` times that.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    cm = importlib.import_module("crd_jax.ops.conv")
    rng = np.random.default_rng(0)
    arr = lambda s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
    w = call["w"]
    kernel, cout = tuple(w[:-2]), w[-1]
    nd = len(kernel)
    padding = cm.default_padding(kernel)
    if call["op"] == "conv":
        x = call["x"]
        s = call["stride"]
        stride = tuple(s) if isinstance(s, (tuple, list)) else (s,) * nd
        out = cm._out_shape(x[1:-1], kernel, stride, padding)
        fn = jax.jit(lambda x, dz: cm._weight_grad(x, dz, kernel, stride, padding))
        flops = 2.0 * x[0] * np.prod(out) * np.prod(kernel) * x[-1] * cout
        return fn, (arr(x), arr((x[0], *out, cout))), flops
    low, skip = call["low"], call["skip"]
    coarse_kernel = tuple(k + 1 for k in kernel)
    coarse_pad = tuple((k - 1 - lo, k - 1 - lo) for k, (lo, _) in zip(kernel, padding))
    ones = (1,) * nd

    def fn(low, skip, dz):
        g = cm._native_weight_grad(dz, low, coarse_kernel, (2,) * nd, coarse_pad)
        return g, cm._weight_grad(skip, dz, kernel, ones, padding)

    flops = (
        2.0
        * low[0]
        * cout
        * (np.prod(low[1:-1]) * np.prod(coarse_kernel) * low[-1] + np.prod(skip[1:-1]) * np.prod(kernel) * skip[-1])
    )
    return jax.jit(fn), (arr(low), arr(skip), arr((skip[0], *skip[1:-1], cout))), flops


def _best_call(fn, args, budget_s: float = 0.2, most: int = 20) -> tuple:
    """The fastest of repeated calls within about ``budget_s`` (small layers take well under a millisecond: one
    call per round would measure the scheduler): its wall-clock seconds and the least process CPU seconds a call
    took (all threads: the work done, not the wait for a core)."""
    import jax

    best, cpu, spent, n = float("inf"), float("inf"), 0.0, 0
    while n < 1 or (spent < budget_s and n < most):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        dt, dc = time.perf_counter() - t, time.process_time() - c
        best, cpu, spent, n = min(best, dt), min(cpu, dc), spent + dt, n + 1
    return best, cpu


def time_layers(shape, batch, repeats, log=print) -> dict:
    """``{model: [row]}``: per layer, the forward and the weight gradient (ms) under each kernel, and the weight
    gradient's floating-point operations."""
    import jax

    from crd_jax.models import build as mbuild

    config = train_budget.pipeline_config(shape, batch=batch)
    arch = mbuild.architecture(config.model)
    out = {}
    for factor, label in ((1, "VM-H"), (2, "VM-L")):
        calls = train_budget.record_layers(mbuild.registrar_from_config(arch, factor), shape, batch)
        compiled, flops = {}, {}
        for i, call in enumerate(calls):
            fwd, fwd_args = train_budget.layer_functions(call)["forward"]
            wg, wg_args, flops[i] = wgrad_calls(call)
            for kind, fn, args in (("forward", fwd, fwd_args), ("weight grad", wg, wg_args)):
                compiled[(i, kind)] = (fn.lower(*args).compile(), args)
                jax.block_until_ready(compiled[(i, kind)][0](*args))
        best, cpu = {}, {}
        for r in range(repeats):
            for kernel in KERNELS if r % 2 == 0 else KERNELS[::-1]:  # each kernel first in every other round
                use(kernel)
                for key, (fn, args) in compiled.items():
                    wall_s, cpu_s = _best_call(fn, args)
                    best[(kernel, key)] = min(best.get((kernel, key), float("inf")), wall_s)
                    cpu[(kernel, key)] = min(cpu.get((kernel, key), float("inf")), cpu_s)
            log(f"{label}: round {r + 1}/{repeats}")
        out[label] = [
            {
                "layer": train_budget._layer_name(call),
                "wgrad_gflop": flops[i] / 1e9,
                **{f"forward_ms_{k}": 1e3 * best[(k, (i, "forward"))] for k in KERNELS},
                **{f"wgrad_ms_{k}": 1e3 * best[(k, (i, "weight grad"))] for k in KERNELS},
                **{f"wgrad_cpu_ms_{k}": 1e3 * cpu[(k, (i, "weight grad"))] for k in KERNELS},
            }
            for i, call in enumerate(calls)
        ]
    return out


def time_steps(shape, batch, repeats, stages, log=print) -> list:
    """Whole steps of ``stages`` (``train_budget.StageTimer``) under each kernel in turn, minimum over rounds."""
    timers = train_budget.stage_timers(shape, stages, batch)
    for timer in timers.values():  # warm-up
        for what in ("forward", "network", "step"):
            timer.run(what)
    best = {}
    for r in range(repeats):
        for kernel in KERNELS if r % 2 == 0 else KERNELS[::-1]:
            use(kernel)
            for name, timer in timers.items():
                for what in ("forward", "network", "step"):
                    dt = timer.run(what)
                    key = (kernel, name, what)
                    best[key] = min(best.get(key, float("inf")), dt)
        log(f"steps: round {r + 1}/{repeats}")
    rows = []
    for name in stages:
        row = {"stage": name, "label": train_budget.LABELS[name]}
        for kernel in KERNELS:
            fwd, net, step = (best[(kernel, name, w)] for w in ("forward", "network", "step"))
            row[f"forward_s_{kernel}"] = fwd
            row[f"backward_s_{kernel}"] = max(net - fwd, 0.0)
            row[f"step_s_{kernel}"] = step
        rows.append(row)
    return rows


def _ratio(old, new) -> str:
    return f"{old / new:.2f}x" if new > 0 else "-"


def render(payload) -> str:
    peak = max(payload["fma_peak_gflops"], recorded_peak(payload))
    core_peak = peak / max(payload["fma_peak"]["threads"], 1)
    old_name, new_name = payload.get("kernels", ["rows", "blocked"])  # results written before --compare: the defaults
    old_label = "rows, AVX2" if old_name == "rows" else f"{old_name}, {payload['isa']}"
    lines = [
        f"# The convolutions' backward pass: weight-gradient kernel old ({old_label}) vs new ({new_name}, {payload['isa']})",
        "",
        f"{payload['shape'][0]}x{payload['shape'][1]}x{payload['shape'][2]}, batch {payload['batch']}, "
        f"{payload['conv']}; {payload['machine'].get('cpu', '')}. One process, the two kernels alternated, minimum "
        f"of {payload['repeats']} rounds (a shared machine: read the ratios). FMA peak: {peak:.0f} GFLOP/s, the "
        f"larger of `results/cpu_peak.json` for this CPU ({recorded_peak(payload):.0f}) and `cpu_peak.py`'s probe run "
        f"alongside with {payload['fma_peak']['threads']} threads (one thread alone x threads: "
        f"{payload['fma_peak']['one_thread_x_threads']:.0f}; all at once, as the shared machine left them: "
        f"{payload['fma_peak']['all_threads']:.0f}). "
        "Regenerate: `python benchmarks/conv_backward.py`.",
        "",
    ]
    if payload.get("steps"):
        lines += [
            "Whole training steps (s): backward = network forward + backward minus forward; step = the full step "
            "(loss, optimizer).",
            "",
            "| Stage | Forward | Backward old | Backward new | old / new | Step old | Step new | old / new "
            "| Step / forward (new) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in payload["steps"]:
            lines.append(
                f"| {r['label']} | {r['forward_s_new']:.3f} | {r['backward_s_old']:.3f} | {r['backward_s_new']:.3f} "
                f"| {_ratio(r['backward_s_old'], r['backward_s_new'])} | {r['step_s_old']:.3f} | {r['step_s_new']:.3f} "
                f"| {_ratio(r['step_s_old'], r['step_s_new'])} | {r['step_s_new'] / r['forward_s_new']:.1f}x |"
            )
        lines.append("")
    for label, rows in payload["layers"].items():
        lines += [
            f"{label}, per layer (ms): the forward, and the native weight-gradient calls of its backward pass (for "
            "the decoder's fused step: the coarse-grid correlation of the upsampled channels and the skip's, "
            'upcat_backward("coarse_split")\'s calls); '
            "GFLOP/s: their floating-point operations over the new kernel's time; per CPU-second: over its process "
            f"CPU time, and % of one core's peak ({core_peak:.0f} GFLOP/s):",
            "",
            "| Layer | Forward | Weight grad old | Weight grad new | old / new | GFLOP/s new | % of FMA peak "
            "| GFLOP per CPU-s old | GFLOP per CPU-s new | % of one core | old / new per CPU-s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            new = r["wgrad_ms_new"]
            gflops = r["wgrad_gflop"] / (new / 1e3) if new > 0 else 0.0
            cpu_ms = r.get("wgrad_cpu_ms_new", 0.0)  # absent from results written before it was recorded
            per_cpu = r["wgrad_gflop"] / (cpu_ms / 1e3) if cpu_ms > 0 else 0.0
            cpu_old = r.get("wgrad_cpu_ms_old", 0.0)
            per_cpu_old = f"{r['wgrad_gflop'] / (cpu_old / 1e3):.0f}" if cpu_old > 0 else "-"
            lines.append(
                f"| {r['layer']} | {r['forward_ms_new']:.1f} | {r['wgrad_ms_old']:.1f} | {new:.1f} "
                f"| {_ratio(r['wgrad_ms_old'], new)} | {gflops:.0f} | {100 * gflops / peak:.0f}% | {per_cpu_old} "
                f"| {f'{per_cpu:.0f} | {100 * per_cpu / core_peak:.0f}%' if per_cpu > 0 else '- | -'} "
                f"| {_ratio(cpu_old, cpu_ms) if cpu_old > 0 else '-'} |"
            )
        tot = {k: sum(r[k] for r in rows) for k in ("forward_ms_new", "wgrad_ms_old", "wgrad_ms_new")}
        lines.append(
            f"| **sum** | **{tot['forward_ms_new']:.0f}** | {tot['wgrad_ms_old']:.0f} | **{tot['wgrad_ms_new']:.0f}** "
            f"| {_ratio(tot['wgrad_ms_old'], tot['wgrad_ms_new'])} | | | | | | |"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=6, help="rounds (each kernel first in every other one)")
    p.add_argument("--stages", nargs="+", default=["vm_h", "vm_l"], choices=list(train_budget.LABELS))
    p.add_argument("--no-steps", action="store_true", help="the per-layer tables only")
    p.add_argument("--quick", action="store_true", help="32^3, 2 rounds: a check that it runs")
    p.add_argument("--out", type=Path, default=HERE / "results" / "conv_backward")
    p.add_argument("--render", type=Path, metavar="JSON", help="rebuild the tables from a results JSON")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("OLD", "NEW"),
        default=("rows", "blocked"),
        choices=("rows", "blocked", "winograd", "auto"),
        help="the two weight-gradient kernels (default: rows blocked)",
    )
    args = p.parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
        write(args.out, payload, render(payload))
        return
    _SETTING.update(old=args.compare[0], new=args.compare[1])
    shape = (32, 32, 32) if args.quick else tuple(args.shape)
    repeats = 2 if args.quick else args.repeats

    from crd_jax.ops import native

    if not native.available():
        raise SystemExit("conv_backward.py compares the native kernels: " + native.describe())
    probe = {"seconds": 0.05, "tries": 1} if args.quick else {}  # --quick checks that it runs, measures nothing
    before = fma_peak_gflops(**probe)
    layers = time_layers(shape, args.batch, repeats)
    steps = [] if args.no_steps else time_steps(shape, args.batch, repeats, args.stages)
    after = fma_peak_gflops(**probe)
    peaks = {k: max(before[k], after[k]) for k in before}
    use("new")
    payload = {
        "shape": list(shape),
        "batch": args.batch,
        "repeats": repeats,
        "isa": native.isa(),
        "kernels": list(args.compare),
        "conv": native.describe(),
        "fma_peak": peaks,
        "fma_peak_gflops": max(peaks["all_threads"], peaks["one_thread_x_threads"]),
        "layers": layers,
        "steps": steps,
        "machine": machine(),
    }
    write(args.out, payload, render(payload))


if __name__ == "__main__":
    main()
