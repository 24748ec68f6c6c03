"""Inference latency and memory of crd-jax models at H, L (n = 2) and LL (n = 4) input sizes (the paper's
"GPU (MB)" and "GPU (s)" columns, Tables II-V), one fresh process per configuration.

    python benchmarks/efficiency.py                          # VM and VM-diff at OASIS size, 160x192x224
    python benchmarks/efficiency.py --shape 160 192 160      # LPBA40 size
    python benchmarks/efficiency.py --compare-lax            # also the lax.conv path, for the memory check

For each model and factor n the input is padded to a multiple of 16 n (LL at OASIS size: the 1/4 grid
40x48x56 cannot pass a 4-level U-Net, so it runs at 48x48x64) and the whole model runs: downsampling,
network, upsampling of the field. Reported: median (min-max) latency over ``--repeats`` runs after one
warm-up, compile time, XLA's compiled memory (arguments, outputs, temporaries), the process's peak RSS
(and the RSS right after import, the runtime's own share), and on a GPU the device's peak memory.
GFLOP: XLA's count for the same model written with lax.conv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import HERE, fmt, fmt_latency, machine, padded, run_child, write

NAMES = {"vm": "VM", "vm_diff": "VM-diff", "vxmdense": "VxmDense layout"}
SUFFIX = {1: "H", 2: "L", 4: "LL"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 192, 224))
    p.add_argument("--models", nargs="+", default=["vm", "vm_diff"])
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--train-factors", type=int, nargs="*", default=[2, 4], help="factors whose training step is timed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-lax", action="store_true", help="also run VM-L with lax.conv (the memory check)")
    p.add_argument("--lax-shape", type=int, nargs=3, default=(96, 96, 128), help="input of the lax comparison")
    p.add_argument("--out", type=Path, default=HERE / "results" / "efficiency")
    args = p.parse_args()

    rows = []
    for model in args.models:
        for mode, factors in (("infer", args.factors), ("train", args.train_factors)):
            for n in factors:
                canvas = padded(args.shape, 16 * n)
                r = run_child(model, canvas, n, mode, args.repeats, flops=True, log=print)
                r["network_input"] = [s // n for s in canvas]
                rows.append(r)
    if args.compare_lax:
        for mode in ("infer", "train"):
            for conv in ("native", "lax"):
                r = run_child("vm", padded(args.lax_shape, 32), 2, mode, args.repeats, conv=conv, log=print)
                r["network_input"] = [s // 2 for s in padded(args.lax_shape, 32)]
                r["lax_comparison"] = True
                rows.append(r)

    lines = [
        f"Input {'x'.join(map(str, args.shape))}; {machine().get('cpu', '')}, {machine()['cpus']} cores; "
        f"median (min-max) of {args.repeats} runs after a warm-up.",
        "",
    ]
    for mode in ("infer", "train"):
        sel = [r for r in rows if r["mode"] == mode and not r.get("lax_comparison")]
        if not sel:
            continue
        title = "Inference" if mode == "infer" else "Training step (forward + backward, NCC 9^3 + grad, at the H grid)"
        lines += [
            f"**{title}**",
            "",
            "| Model | Input -> network | Latency (s) | vs H | Compile (s) | XLA memory (MB): args / out / temp / total | vs H | Peak RSS (MB) | GFLOP | GFLOP/s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            ref = next((q for q in sel if q["model"] == r["model"] and q["factor"] == 1 and "error" not in q), None)
            lat_ratio = f"{r['latency_s'] / ref['latency_s']:.0%}" if ref and "error" not in r else "-"
            mem_ratio = f"{r['xla_total_mb'] / ref['xla_total_mb']:.0%}" if ref and "error" not in r else "-"
            gflops = r.get("gflop")
            rate = f"{gflops / r['latency_s']:.1f}" if gflops and "error" not in r else "-"
            lines.append(
                f"| {NAMES[r['model']]}-{SUFFIX[r['factor']]} | {'x'.join(map(str, r['shape']))} -> {'x'.join(map(str, r['network_input']))} | {fmt_latency(r)} "
                f"| {lat_ratio} | {fmt(r.get('compile_s'), 1)} | {fmt(r.get('xla_arguments_mb'))} / {fmt(r.get('xla_outputs_mb'))} / "
                f"{fmt(r.get('xla_temporaries_mb'))} / {fmt(r.get('xla_total_mb'))} | {mem_ratio} | {fmt(r.get('peak_rss_mb'))} "
                f"| {fmt(gflops, 1)} | {rate} |"
            )
        lines.append("")
    lax = [r for r in rows if r.get("lax_comparison")]
    if lax:
        lines += [
            f"**Native kernel vs lax.conv (VM-L, input {'x'.join(map(str, args.lax_shape))})**",
            "",
            "| Mode | Conv | Latency (s) | XLA total (MB) | Peak RSS (MB) |",
            "|---|---|---|---|---|",
        ]
        for r in lax:
            lines.append(
                f"| {r['mode']} | {r.get('conv', '?')} | {fmt_latency(r)} | {fmt(r.get('xla_total_mb'))} | {fmt(r.get('peak_rss_mb'))} |"
            )
        lines.append("")
    write(
        args.out,
        {
            "machine": machine(),
            "args": {
                k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            },
            "rows": rows,
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
