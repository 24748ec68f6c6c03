"""The decoder's upcat backward, two ways in one process (``upcat_backward`` modes, crd_jax/ops/conv.py):

* ``--compare coarse_split coarse`` (the default -> results/upcat_backward_wgrad): the weight gradient of both
  inputs as one Winograd pass that reads the upsampled channels on their coarse grid (``"coarse"``, the default on
  AVX-512), against the stride-2 coarse correlation's weight gradient plus the skip's own (``"coarse_split"``);
* ``--compare coarse_fused_skip coarse`` (-> results/upcat_backward_skip): the image pair's 2 skip channels beside
  the finest level inside the fused weight gradient, against their weight gradient apart (the direct kernel);
* ``--compare coarse_direct coarse_split`` (-> results/upcat_backward): the upsampled channels' input gradient as
  one Winograd pass over the fine grid whose 2x2x2 sums need 27 of its 64 products, against the stride-2
  correlation on the coarse grid (``"coarse_direct"``).

    python benchmarks/upcat_backward.py            # 128^3: decoder levels, VM-H and VM-L steps
    python benchmarks/upcat_backward.py --quick    # 32^3, 2 rounds (a check that it runs)

Every function is compiled both ways in ONE process and the rounds alternate, minimum over rounds: read the
ratios. The layer rows are ``jax.grad`` of ``sum(conv_upsampled_concat(low, skip, w, b) * r)`` with respect to
what training differentiates (the skip is the image pair at the finest level, data: no gradient); the steps are
``train_budget.py``'s.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, write  # noqa: E402

#: (before, after) -> (results name, what changes)
COMPARISONS = {
    ("coarse_split", "coarse"): (
        "upcat_backward_wgrad",
        "Before: the weight gradient as the stride-2 coarse correlation's for the upsampled channels plus the skip's "
        'own (`upcat_backward("coarse_split")`); after: one Winograd pass for both, the upsampled channels read on '
        'their coarse grid (27 of 64 products per tile) and the gradient transform shared (`"coarse"`, '
        "`csrc/ffi_glue.cc: ConvWgradUpcat`; a skip of at most 4 channels apart, as the direct kernel).",
    ),
    ("coarse_fused_skip", "coarse"): (
        "upcat_backward_skip",
        "Before: a skip of a few channels (the image pair beside the finest level) inside the fused Winograd weight "
        'gradient, a whole 16-lane group of its transforms for 2 channels (`upcat_backward("coarse_fused_skip")`); '
        "after: that skip's weight gradient apart, as the direct kernel, the Winograd pass given the upsampled "
        'channels alone (`"coarse"`).',
    ),
    ("coarse_direct", "coarse_split"): (
        "upcat_backward",
        "Before: the upsampled channels' input gradient as a stride-2 correlation on the coarse grid "
        '(`upcat_backward("coarse_direct")`); after: one Winograd pass over the fine grid keeping the 27 of 64 '
        'products its 2x2x2 sums need (`"coarse_split"`, `csrc/ffi_glue.cc: ConvPooledT`).',
    ),
}


def levels(shape):
    """VM's decoder steps at full resolution ``shape``: (low, skip, C_out, skip differentiated)."""
    s = tuple(shape)
    half = tuple(n // 2 for n in s)
    quarter = tuple(n // 4 for n in s)
    eighth = tuple(n // 8 for n in s)
    return [
        ((1, *half, 32), (1, *s, 2), 16, False),
        ((1, *quarter, 32), (1, *half, 16), 32, True),
        ((1, *eighth, 32), (1, *quarter, 32), 32, True),
    ]


def _time_rounds(fns: dict, repeats: int) -> dict:
    import jax

    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (fn, args) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def layer_functions(shape, modes):
    import jax
    import jax.numpy as jnp

    conv = importlib.import_module("crd_jax.ops.conv")
    fns = {}
    for i, (low_s, skip_s, co, skip_grad) in enumerate(levels(shape)):
        k = jax.random.split(jax.random.PRNGKey(i), 4)
        low, skip = jax.random.normal(k[0], low_s), jax.random.normal(k[1], skip_s)
        w = 0.05 * jax.random.normal(k[2], (3, 3, 3, low_s[-1] + skip_s[-1], co))
        b, r = jnp.zeros((co,)), jax.random.normal(k[3], (*skip_s[:-1], co))
        argnums = (0, 1, 2, 3) if skip_grad else (0, 2, 3)
        name = f"up({'x'.join(map(str, low_s[1:4]))}) ++ skip {'x'.join(map(str, skip_s[1:4]))}, {low_s[-1]}+{skip_s[-1]} -> {co}"
        for mode in modes:
            conv.upcat_backward(mode)
            g = jax.grad(lambda low, skip, w, b: jnp.sum(conv.conv_upsampled_concat(low, skip, w, b, 0.2) * r), argnums)
            fns[(name, mode)] = (jax.jit(g).lower(low, skip, w, b).compile(), (low, skip, w, b))
    return fns


def step_timers(shape, stages, modes):
    import train_budget as tb

    conv = importlib.import_module("crd_jax.ops.conv")
    by_mode = {}
    for mode in modes:  # each stage compiled under each mode
        conv.upcat_backward(mode)
        by_mode[mode] = tb.stage_timers(shape, stages)
    return {(tb.LABELS.get(st, st), mode): by_mode[mode][st] for st in stages for mode in modes}


def render(payload) -> str:
    m = payload["machine"]
    shape = "x".join(map(str, payload["shape"]))
    before, after = payload["modes"]
    md = [
        f"The decoder's upcat backward at {shape}, batch 1 ({m.get('cpu', '')}, {m.get('cpus', '?')} cores; {payload['conv']}; "
        f"1-minute load average {payload['load']:.1f} at the start, {payload['load_end']:.1f} at the end). "
        f"{COMPARISONS[(before, after)][1]} Both compiled in one process, rounds alternating, minimum of "
        f"{payload['repeats']} rounds. Regenerate: `python benchmarks/upcat_backward.py --compare {before} {after}`.",
        "",
        "| Layer or step | Before (ms) | After (ms) | Before / after |",
        "|---|---|---|---|",
    ]
    for name, v in payload["rows"].items():
        b, a = v[before], v[after]
        md.append(f"| {name} | {1e3 * b:.1f} | {1e3 * a:.1f} | {b / a:.2f}x |")
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=None, help="full-resolution size (default 128^3; --quick 32^3)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 6; --quick 2)")
    p.add_argument("--stages", nargs="*", default=["vm_h", "vm_l"], help="train_budget stages to time both ways")
    p.add_argument("--quick", action="store_true", help="32^3, 2 rounds, no steps")
    p.add_argument(
        "--compare",
        nargs=2,
        default=["coarse_split", "coarse"],
        metavar=("BEFORE", "AFTER"),
        help="two upcat_backward modes: " + "; ".join(" vs ".join(k) for k in COMPARISONS),
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    modes = tuple(args.compare)
    if modes not in COMPARISONS:
        p.error(f"--compare: one of {'; '.join(' '.join(k) for k in COMPARISONS)}")
    shape = tuple(args.shape or ((32, 32, 32) if args.quick else (128, 128, 128)))
    repeats = args.repeats or (2 if args.quick else 6)
    from crd_jax.ops import native

    payload = {"machine": machine(), "conv": native.describe(), "shape": list(shape), "repeats": repeats}
    payload["modes"] = list(modes)
    payload["load"] = os.getloadavg()[0]
    conv = importlib.import_module("crd_jax.ops.conv")
    before = conv.upcat_backward()
    try:
        fns = layer_functions(shape, modes)
        layer = _time_rounds(fns, repeats)
        rows = {}
        for (name, mode), t in layer.items():
            rows.setdefault(f"{name}, forward + backward", {})[mode] = t
        if not args.quick:
            timers = step_timers(shape, tuple(args.stages), modes)
            for t in timers.values():
                t.run("step")
                t.times["step"].clear()
            for _ in range(repeats):
                for t in timers.values():
                    t.run("step")
            for (label, mode), t in timers.items():
                rows.setdefault(f"{label} step", {})[mode] = min(t.times["step"])
    finally:
        conv.upcat_backward(before)
    payload["rows"] = rows
    payload["load_end"] = os.getloadavg()[0]
    name = COMPARISONS[modes][0] + ("_quick" if args.quick else "")
    write(args.out or HERE / "results" / name, payload, render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
