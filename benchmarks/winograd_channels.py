"""Where the Winograd path stops paying as a layer's input channels fall: stride-1 3^3 convolutions with 16 output
channels and C_in input channels under three settings: Winograd wherever it applies, the default threshold
(``native.winograd_min_input_channels``, 8: Winograd from 8 input channels, the direct kernel below) and the
direct kernel everywhere (``native.set_winograd(False)``); and whole training steps under each.

    python benchmarks/winograd_channels.py            # 128^3: C_in 2-16, the flow head, VM-H and VM-L steps
    python benchmarks/winograd_channels.py --quick    # 32^3, 2 rounds, no steps (a check that it runs)
    python benchmarks/winograd_channels.py --render benchmarks/results/winograd_channels.json

Both settings are read when a convolution runs, so each function is compiled once and every round runs it under
the three settings in turn (their order reversed in every other round); minimum over rounds, ONE process: read
the ratios. The flow head (VM's last layer, 16 -> 3 channels) is where a training step meets few input channels: its
input gradient is a 3 -> 16 convolution, which the Winograd path took before the threshold. Needs AVX-512 (the
Winograd path's instruction set). Writes ``results/winograd_channels.{md,json}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, write  # noqa: E402

CHANNELS = (2, 3, 4, 6, 8, 12, 16)
#: (setting name, Winograd on, threshold): Winograd wherever the path applies, the default, the direct kernel
SETTINGS = (("everywhere", True, 1), ("default", True, None), ("direct", False, None))


def layer_functions(shape, channels):
    """``{C_in: (compiled conv, args)}``: 3^3, stride 1, C_in -> 16 on ``(1, *shape, C_in)``."""
    import jax
    import jax.numpy as jnp

    conv = importlib.import_module("crd_jax.ops.conv")
    fns = {}
    for ci in channels:
        k = jax.random.split(jax.random.PRNGKey(ci), 2)
        x = jax.random.normal(k[0], (1, *shape, ci))
        w = 0.1 * jax.random.normal(k[1], (3, 3, 3, ci, 16))
        b = jnp.zeros((16,))
        fns[f"conv {ci} -> 16"] = (jax.jit(lambda x, w, b: conv.conv(x, w, b)).lower(x, w, b).compile(), (x, w, b))
    # VM's flow head and its input gradient (the 3 -> 16 correlation with the flipped kernel)
    k = jax.random.split(jax.random.PRNGKey(99), 3)
    x = jax.random.normal(k[0], (1, *shape, 16))
    w = 0.1 * jax.random.normal(k[1], (3, 3, 3, 16, 3))
    b, r = jnp.zeros((3,)), jax.random.normal(k[2], (1, *shape, 3))
    grad_x = jax.jit(jax.grad(lambda x, w, b: jnp.sum(conv.conv(x, w, b) * r)))
    fns["flow head 16 -> 3, input gradient"] = (grad_x.lower(x, w, b).compile(), (x, w, b))
    return fns


def step_timers(shape, stages):
    import train_budget as tb

    if not stages:
        return {}
    return {tb.LABELS.get(st, st): timer for st, timer in tb.stage_timers(shape, stages).items()}


def measure(shape, repeats, stages, log=print):
    """``({row: {setting: seconds}}, the default threshold)``: every function under each setting in turn per
    round, the minimum kept."""
    import jax

    from crd_jax.ops import native

    default = native.winograd_min_input_channels()
    settings = {name: (on, t if t is not None else default) for name, on, t in SETTINGS}
    runs = {name: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for name, (f, a) in layer_functions(shape, CHANNELS).items()}
    for label, timer in step_timers(shape, stages).items():
        runs[f"{label} step"] = lambda t=timer: t.run("step")
    times = {row: {s: [] for s in settings} for row in runs}
    order = list(settings)
    try:
        for fn in runs.values():  # warm: first calls fault in their buffers
            fn()
        for i in range(repeats):
            for setting in order if i % 2 == 0 else order[::-1]:
                native.set_winograd(settings[setting][0])
                native.set_winograd_min_input_channels(settings[setting][1])
                for row, fn in runs.items():
                    t = time.perf_counter()
                    fn()
                    times[row][setting].append(time.perf_counter() - t)
            log(f"  round {i + 1} of {repeats}")
    finally:
        native.set_winograd(True)
        native.set_winograd_min_input_channels(default)
    return {row: {s: min(v) for s, v in per.items()} for row, per in times.items()}, default


def render(payload) -> str:
    m = payload["machine"]
    shape = "x".join(map(str, payload["shape"]))
    md = [
        f"Winograd F(2x2x2, 3x3x3) and layers of few input channels at {shape}, batch 1 ({m.get('cpu', '')}, "
        f"{m.get('cpus', '?')} cores; {payload['conv']}; 1-minute load average {payload['load']:.1f} at the start, "
        f"{payload['load_end']:.1f} at the end). Everywhere: the Winograd path on every stride-1 3^3 layer with output "
        f"channels in multiples of 16 (threshold 1); default: only with at least {payload['default_threshold']} input "
        f"channels, the direct kernel below (rows at or above the threshold run the same code in both columns); "
        f"direct: no Winograd in forward and input-gradient passes (`native.set_winograd(False)`; weight gradients keep "
        f"their own kernel choice, `CRD_JAX_WGRAD`, Winograd-domain on VM's wide layers). Each function compiled "
        f"once, every round runs it under the three settings in turn; "
        f"minimum of {payload['repeats']} rounds. Regenerate: `{payload['command']}`.",
        "",
        "| Layer or step | Everywhere (ms) | Default (ms) | Direct (ms) | Direct / everywhere | Everywhere / default |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in payload["rows"].items():
        a, b, c = v["everywhere"], v["default"], v["direct"]
        md.append(f"| {name} | {1e3 * a:.1f} | {1e3 * b:.1f} | {1e3 * c:.1f} | {c / a:.2f}x | {a / b:.2f}x |")
    return "\n".join(md) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=None, help="volume size (default 128^3; --quick 32^3)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 7; --quick 2)")
    p.add_argument("--stages", nargs="*", default=["vm_h", "vm_l"], help="train_budget stages to time both ways")
    p.add_argument("--quick", action="store_true", help="32^3, 2 rounds, no steps")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--render", type=Path, metavar="JSON", help="rebuild the table from a results JSON")
    args = p.parse_args(argv)
    out = args.out or HERE / "results" / ("winograd_channels_quick" if args.quick else "winograd_channels")
    if args.render:
        payload = json.loads(args.render.read_text())
        write(out, payload, render(payload))
        return 0
    from crd_jax.ops import native

    if native.set_isa("avx512") != "avx512" or not native.winograd():
        print("winograd_channels: the Winograd path needs the native kernel on AVX-512, switched on", file=sys.stderr)
        return 2
    shape = tuple(args.shape or ((32, 32, 32) if args.quick else (128, 128, 128)))
    repeats = args.repeats or (2 if args.quick else 7)
    payload = {"machine": machine(), "conv": native.describe(), "shape": list(shape), "repeats": repeats}
    payload["command"] = " ".join(["python benchmarks/winograd_channels.py", *(sys.argv[1:] if argv is None else argv)])
    payload["load"] = os.getloadavg()[0]
    rows, default = measure(shape, repeats, () if args.quick else tuple(args.stages))
    payload.update(rows=rows, default_threshold=default, load_end=os.getloadavg()[0])
    write(out, payload, render(payload))
    return 0


if __name__ == "__main__":
    from crd_jax.allocator import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc((__file__,))  # the training steps as train.py runs them (crd_jax/allocator.py)
    sys.exit(main())
