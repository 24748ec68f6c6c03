"""The full-resolution registration loss of a training step (NCC 9^3 + trilinear warp + grad-L2, and the x2
upsampling of a low-resolution model's field), forward and backward, before and after a change of formulation,
and the VM-L / control step's loss share both ways.

    python benchmarks/loss_speed.py                    # 128^3: pieces + VM-L and control steps -> results/loss_speed.{md,json}
    python benchmarks/loss_speed.py --compare upsample # the native field upsampling -> results/loss_speed_upsample.{md,json}
    python benchmarks/loss_speed.py --no-steps         # the loss pieces only
    python benchmarks/loss_speed.py --quick            # 32^3, 2 rounds (a check that it runs)

``--compare loss`` (default): "before" is the formulation before the native loss kernels (NCC as XLA's
reduce_window box sums and autodiff, ``ncc_formulation("xla")``; the warp's field gradient a second native pass,
``warp_gradient("regather")``; grad-L2 as ``jnp.diff`` and autodiff, ``grad_l2_formulation("xla")``); "after" is
the default (the three ``"native"``). ``--compare upsample``: "before" is XLA's stencil for the field upsampling
(``upsample_vjp("stencil")``), "after" the native kernel (``"native"``, the default); the loss kernels are the
default's both ways. Every function is compiled
both ways in ONE process and the rounds alternate before / after (each function once per round, minimum over
rounds), so a machine shared with other work slows both alike: read the ratios. CPU seconds (user + system of
the process over the rounds, divided by the calls) are reported beside the wall-clock minimum, since a loaded
machine stretches wall time. The steps are ``train_budget.py``'s (the stage's loss and train step; loss = step -
network forward + backward).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, write  # noqa: E402

DEFAULTS = {
    "ncc": "native",
    "warp": "native",
    "grad_l2": "native",
    "upsample": "native",
    "grad_l2_coarse": True,
    "mse_coarse": True,
}
#: ``--compare``: the two variants of each comparison (what they change from :data:`DEFAULTS`)
COMPARISONS = {
    "loss": {"before": {"ncc": "xla", "warp": "regather", "grad_l2": "xla"}, "after": {}},
    "upsample": {"before": {"upsample": "stencil"}, "after": {}},
    # L_reg of an upsampled field on the fine grid (before) or the coarse one (after; crd_jax/ops/grad_l2.py)
    "coarse_grad_l2": {"before": {"grad_l2_coarse": False}, "after": {}},
    # eq. 8 on the full grid, MSE(up(phi^T), up(phi^S)), on the fine grid with up(phi^T) cached (before) or on
    # the coarse grid with phi^T cached (after; crd_jax/ops/grad_l2.py mse_of_upsampled)
    "coarse_mse": {"before": {"mse_coarse": False}, "after": {}},
}


@contextlib.contextmanager
def formulation(name, comparison="loss"):
    """NCC, warp, grad-L2 and upsampling formulations of variant ``name`` of ``comparison`` while functions are
    traced."""
    from crd_jax.ops import grad_l2 as grad_l2_ops
    from crd_jax.ops import ncc as ncc_ops
    from crd_jax.ops import spatial

    knobs = {
        "ncc": ncc_ops.ncc_formulation,
        "warp": spatial.warp_gradient,
        "grad_l2": grad_l2_ops.grad_l2_formulation,
        "upsample": spatial.upsample_vjp,
        "grad_l2_coarse": grad_l2_ops.grad_l2_coarse,
        "mse_coarse": grad_l2_ops.mse_coarse,
    }
    previous = {k: f() for k, f in knobs.items()}
    for k, f in knobs.items():
        f(COMPARISONS[comparison][name].get(k, DEFAULTS[k]))
    try:
        yield
    finally:
        for k, f in knobs.items():
            f(previous[k])


def loss_pieces(shape, batch=1):
    """``{piece: (fn, args)}``: jitted pieces of the loss, gradients with respect to what training differentiates
    (the field; NCC's warped image)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crd_jax.losses import grad_l2, ncc, registration_loss
    from crd_jax.ops.grad_l2 import field_mse
    from crd_jax.ops.spatial import upsample_field, warp

    rng = np.random.default_rng(0)
    m, f = (jnp.asarray(rng.random((batch, *shape, 1), np.float32)) for _ in range(2))
    # a smooth field of a few voxels (a trained network's scale), not white noise
    low = rng.standard_normal((batch, *(max(s // 8, 1) for s in shape), 3)).astype(np.float32) * 2.0
    d = jax.image.resize(jnp.asarray(low), (batch, *shape, 3), "linear")
    g1 = jnp.asarray(rng.standard_normal((batch, *shape, 1)).astype(np.float32))
    # a low-resolution model's field (n = 2) and a cotangent of the upsampled one
    coarse = jax.image.resize(jnp.asarray(low), (batch, *(max(s // 2, 1) for s in shape), 3), "linear") * 0.5
    g3 = jnp.asarray(rng.standard_normal((batch, *(2 * max(s // 2, 1) for s in shape), 3)).astype(np.float32))
    vg = lambda fn: jax.jit(jax.value_and_grad(fn))  # noqa: E731
    return {
        "warp, forward": (jax.jit(lambda m, d: warp(m, d)), (m, d)),
        "warp, forward + backward (field)": (vg(lambda d, m, g: jnp.sum(warp(m, d) * g)), (d, m, g1)),
        "NCC 9^3, forward": (jax.jit(lambda w, f: ncc(f, w)), (m, f)),
        "NCC 9^3, forward + backward (warped image)": (vg(lambda w, f: ncc(f, w)), (m, f)),
        "grad-L2, forward + backward": (vg(grad_l2), (d,)),
        "registration loss (warp + NCC + grad-L2), forward + backward": (
            vg(lambda d, m, f: registration_loss(m, f, d)[0]),
            (d, m, f),
        ),
        "field upsampling x2, forward": (jax.jit(lambda c: upsample_field(c, 2)), (coarse,)),
        "grad-L2 of the upsampled coarse field, forward + backward": (vg(lambda c: grad_l2(upsample_field(c, 2))), (coarse,)),
        "field upsampling x2, forward + backward": (vg(lambda c, g: jnp.sum(upsample_field(c, 2) * g)), (coarse, g3)),
        "eq. 8 on the full grid of two upsampled coarse fields, forward + backward": (
            vg(lambda c, t: field_mse(upsample_field(c, 2), upsample_field(t, 2))),
            (coarse, coarse[..., ::-1] * 0.5),
        ),
        "registration loss of a coarse field (upsampling x2 + warp + NCC + grad-L2), forward + backward": (
            vg(lambda c, m, f: registration_loss(m, f, upsample_field(c, 2))[0]),
            (coarse, m, f),
        ),
    }


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_pieces(shape, repeats, log=print, comparison="loss") -> dict:
    """``{piece: {variant: {"wall_s", "cpu_s"}}}``, both variants compiled in this process, rounds alternating."""
    import jax

    built = {}
    for variant in COMPARISONS[comparison]:
        with formulation(variant, comparison):
            for name, (fn, args) in loss_pieces(shape).items():
                built[(name, variant)] = (fn.lower(*args).compile(), args)
                jax.block_until_ready(built[(name, variant)][0](*args))
    # each piece's before and after next to each other in a round (so both follow the same kind of work)
    compiled = {(name, v): built[(name, v)] for name in dict.fromkeys(n for n, _ in built) for v in COMPARISONS[comparison]}
    wall = {k: [] for k in compiled}
    cpu = {k: 0.0 for k in compiled}
    for r in range(repeats):
        for key, (fn, args) in compiled.items():
            c, t = _cpu_seconds(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[key].append(time.perf_counter() - t)
            cpu[key] += _cpu_seconds() - c
        log(f"  round {r + 1}/{repeats}")
    out: dict = {}
    for (name, variant), times in wall.items():
        out.setdefault(name, {})[variant] = {"wall_s": min(times), "cpu_s": cpu[(name, variant)] / repeats}
    return out


#: a stage name with this suffix (``vm_l_crd_cached``): the stage with its teacher cached (train_budget's)
CACHED_SUFFIX = "_cached"


def time_steps(shape, repeats, stages, log=print, comparison="loss") -> list:
    """``train_budget.py``'s step rows for ``stages``, each stage compiled before and after, rounds alternating."""
    import train_budget as tb

    config = tb.pipeline_config(shape)
    data = tb._batch(shape, 1, seed=1)
    plans = tb.plan_pipeline(config, shape, 1, tuple(s.removesuffix(CACHED_SUFFIX) for s in stages))
    timers = []
    for name in stages:
        for variant in COMPARISONS[comparison]:
            with formulation(variant, comparison):
                plan, arrays = plans[name.removesuffix(CACHED_SUFFIX)], data
                if name.endswith(CACHED_SUFFIX):  # S3 with its teacher read from the batch, as its cache stores it
                    plan, arrays = tb.cached_teacher_stage(plan, data)
                timers.append(tb.StageTimer(name, plan, config, arrays, 10_000, variant=None))
            timers[-1].variant = variant
            for what in ("forward", "network", "step"):
                timers[-1].run(what)
                timers[-1].times[what].clear()
            log(f"  [{name} {variant}] compiled")
    cpu = {(id(t), w): 0.0 for t in timers for w in ("network", "step")}
    for r in range(repeats):
        for timer in timers:
            for what in ("forward", "network", "step"):
                c = _cpu_seconds()
                timer.run(what)
                if what != "forward":
                    cpu[(id(timer), what)] += _cpu_seconds() - c
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{t.name} {t.variant} {t.times['step'][-1]:.3f}s" for t in timers))
    rows = []
    for t in timers:
        row = t.result()
        row["loss_share"] = row["loss_s"] / row["step_s"] if row["step_s"] else 0.0
        # CPU seconds per call (mean over rounds): less stretched by other processes than the wall-clock minimum
        row["network_cpu_s"] = cpu[(id(t), "network")] / repeats
        row["step_cpu_s"] = cpu[(id(t), "step")] / repeats
        row["loss_cpu_s"] = max(row["step_cpu_s"] - row["network_cpu_s"], 0.0)
        row["loss_cpu_share"] = row["loss_cpu_s"] / row["step_cpu_s"] if row["step_cpu_s"] else 0.0
        rows.append(row)
    return rows


def render(payload) -> str:
    shape = "x".join(map(str, payload["shape"]))
    m = payload["machine"]
    comparison = payload.get("compare", "loss")
    what = {
        "loss": "Before: NCC as XLA's reduce_window box sums + autodiff, the warp's field gradient a second native "
        "pass, grad-L2 as `jnp.diff` + autodiff; after: the fused native NCC (`csrc/ncc_cpu.cc`), the warp writing its "
        "derivative in the forward (`csrc/warp_linear_cpu.cc`) and the native grad-L2 (`csrc/grad_l2_cpu.cc`). ",
        "upsample": "Before: the field's x2 upsampling as XLA's stencil of slices per axis with its transpose written "
        'out (`upsample_vjp("stencil")`); after: the native upsampling and transpose '
        "(`csrc/upsample_linear_cpu.cc`). The loss kernels are the native ones both ways. ",
        "coarse_grad_l2": "Before: L_reg (grad-L2) of a low-resolution model's upsampled field on the full-resolution "
        "grid (the native forward, XLA's slices backward; `grad_l2_coarse(False)`); after: the same term on the "
        "coarse field's grid through the 1-D Gram matrices of the upsampling (`crd_grad_l2_coarse`, equal up to "
        "rounding; crd_jax/ops/grad_l2.py). The pieces on a given full-resolution field are the same program both "
        "ways (their ratios are this run's noise). ",
        "coarse_mse": "Before: eq. 8 on the full grid, MSE(up(phi^T), up(phi^S)), on the full-resolution fields (S3's "
        "teacher cache holding up(phi^T); `mse_coarse(False)`); after: the same term on the coarse fields' grid "
        "through the tridiagonal Gram matrices of the upsampling (`mse_of_upsampled`, equal up to rounding; "
        "crd_jax/ops/grad_l2.py), the cache holding phi^T only. The pieces on a given full-resolution field are the "
        "same program both ways (their ratios are this run's noise); the eq. 8 piece forms both fields before. ",
    }[comparison]
    command = "python benchmarks/loss_speed.py" + ("" if comparison == "loss" else f" --compare {comparison}")
    md = [
        f"The registration loss at {shape}, batch 1 ({m.get('cpu', '')}, {m.get('cpus', '?')} cores; 1-minute load "
        f"average {payload['load']:.1f} at the start"
        + (f", {payload['load_end']:.1f} at the end" if "load_end" in payload else "")
        + ": a load above the cores this run used means the machine was shared; read the ratios). "
        + what
        + f"Both compiled in one process, rounds alternating, minimum wall time of {payload['repeats']} rounds; CPU "
        "time = user + system seconds per call. "
        f"Regenerate: `{command}`.",
        "",
        "| Piece | Before (ms) | After (ms) | Before / after | CPU before (ms) | CPU after (ms) | CPU before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in payload["pieces"].items():
        b, a = v["before"], v["after"]
        if name == "warp, forward":  # not differentiated, both columns run csrc/warp_cpu.cc: a control
            name += " (the same program both ways: its ratio is this run's noise)"
        md.append(
            f"| {name} | {b['wall_s'] * 1e3:.1f} | {a['wall_s'] * 1e3:.1f} | {b['wall_s'] / a['wall_s']:.2f}x "
            f"| {b['cpu_s'] * 1e3:.1f} | {a['cpu_s'] * 1e3:.1f} | {b['cpu_s'] / a['cpu_s']:.2f}x |"
        )
    if payload.get("steps"):
        md += [
            "",
            "Training steps (`train_budget.py`'s: loss = step - network forward + backward, i.e. warp, NCC, grad-L2 at "
            "the full resolution and Adam; loss share = loss / step; wall: minima over rounds, CPU: means):",
            "",
            "| Stage | Variant | Network fwd + bwd (s) | Loss (s) | Step (s) | Loss share | CPU: network (s) "
            "| CPU: loss (s) | CPU: step (s) | CPU: loss share |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in payload["steps"]:
            md.append(
                f"| {r['label'].split(' (')[0]} | {r['variant']} | {r['network_s']:.3f} | {r['loss_s']:.3f} "
                f"| {r['step_s']:.3f} | {100 * r['loss_share']:.0f}% | {r['network_cpu_s']:.3f} | {r['loss_cpu_s']:.3f} "
                f"| {r['step_cpu_s']:.3f} | {100 * r['loss_cpu_share']:.0f}% |"
            )
    return "\n".join(md) + "\n"


def main(argv=None):
    import os

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=None, help="full-resolution size (default 128^3; --quick 32^3)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 7; --quick 2)")
    p.add_argument("--stages", nargs="*", default=["vm_l", "control"], help="train_budget stages to time")
    p.add_argument("--no-steps", action="store_true", help="the loss pieces only")
    p.add_argument("--quick", action="store_true", help="32^3, 2 rounds, no steps")
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="loss", help="which change to time both ways")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    shape = tuple(args.shape or ((32, 32, 32) if args.quick else (128, 128, 128)))
    repeats = args.repeats or (2 if args.quick else 7)
    from crd_jax.ops import native

    payload = {
        "machine": machine(),
        "conv": native.describe(),
        "shape": list(shape),
        "repeats": repeats,
        "load": os.getloadavg()[0],
        "compare": args.compare,
        "formulations": {v: dict(DEFAULTS, **c) for v, c in COMPARISONS[args.compare].items()},
    }
    payload["pieces"] = time_pieces(shape, repeats, comparison=args.compare)
    payload["steps"] = (
        [] if (args.no_steps or args.quick) else time_steps(shape, repeats, tuple(args.stages), comparison=args.compare)
    )
    payload["load_end"] = os.getloadavg()[0]
    md = render(payload)
    name = "loss_speed" + ("" if args.compare == "loss" else f"_{args.compare}") + ("_quick" if args.quick else "")
    write(args.out or HERE / "results" / name, payload, md)
    return 0


if __name__ == "__main__":
    from crd_jax.allocator import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc((__file__,))  # training steps as train.py runs them (crd_jax/allocator.py)
    sys.exit(main())
