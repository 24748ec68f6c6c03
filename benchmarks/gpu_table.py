"""The paper's Table II on the machine at hand: VM and VM-diff at H, L (n = 2) and LL (n = 4), crd-jax and the
same VM in PyTorch, inference latency and peak memory, one fresh process per row.

    python benchmarks/gpu_table.py                                  # OASIS size 160x192x224 (on a GPU)
    python benchmarks/gpu_table.py --shape 64 64 64 --repeats 2     # a CPU dry run of the same code

On a GPU the memory is the device's peak (``memory_stats()['peak_bytes_in_use']`` for JAX, with
preallocation off; ``torch.cuda.max_memory_allocated`` for PyTorch); on a CPU, XLA's compiled footprint and
the peak RSS. Latency: median of ``--repeats`` after one warm-up, synchronised. The L/LL rows downsample the
pair, run the network and upsample the field, as the paper's L models do. Writes ``<out>/gpu_table.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import HERE, machine, run_child, write

NAMES = {"vm": "VM", "vm_diff": "VM-diff", "torch_same": "VM (PyTorch)"}
SUFFIX = {1: "H", 2: "L", 4: "LL"}
# Table II, OASIS column (GPU MB, GPU s); the paper has no LL row at OASIS size (k = 1 is its largest valid shift)
PAPER = {("vm", 1): (3307, 0.156), ("vm", 2): (551, 0.023), ("vm_diff", 1): (3627, 2.165), ("vm_diff", 2): (679, 0.315)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 192, 224))
    p.add_argument("--models", nargs="+", default=["vm", "vm_diff", "torch_same"])
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_table")
    args = p.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the device peak is what the model needs

    rows = []
    for model in args.models:
        for n in args.factors:
            extra = ["--device", "cuda"] if model.startswith("torch") else []
            rows.append(run_child(model, args.shape, n, "infer", args.repeats, extra=extra, timeout=900))
    m = machine()
    device = m.get("backend", "cpu")
    try:
        import jax

        device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    except Exception:
        pass
    lines = [f"### Table II on {device}, {'x'.join(map(str, args.shape))}", "",
             f"Inference of one pair, median of {args.repeats} after a warm-up; memory: device peak on a GPU, else XLA's "
             "footprint (JAX) / peak RSS (PyTorch).", "",
             "| Model | Framework | Memory (MB) | Latency (s) | vs H: memory | vs H: time | paper GPU MB | paper GPU s |",
             "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        name = f"{NAMES.get(r['model'], r['model'])}-{SUFFIX.get(r['factor'], r['factor'])}"
        if "error" in r:
            lines.append(f"| {name} | - | failed: {' '.join(r['error'])[:80]} | | | | | |")
            continue
        mem = r.get("device_peak_mb") or r.get("xla_total_mb") or r.get("peak_rss_mb", 0.0)
        if r["factor"] == 1:
            base[r["model"]] = (mem, r["latency_s"])
        h = base.get(r["model"])
        rel = (f"{mem / h[0]:.0%} | {r['latency_s'] / h[1]:.0%}" if h else "- | -")
        paper = PAPER.get((r["model"], r["factor"]), ("-", "-"))
        lines.append(f"| {name} | {r.get('framework', '')} | {mem:.0f} | {r['latency_s']:.4f} | {rel} | {paper[0]} | {paper[1]} |")
    write(args.out, {"machine": m, "device": device, "shape": args.shape, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
