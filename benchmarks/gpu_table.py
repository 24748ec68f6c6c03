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
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from common import HERE, machine, run_child, write

NAMES = {"vm": "VM", "vm_diff": "VM-diff", "torch_same": "VM (PyTorch)"}
SUFFIX = {1: "H", 2: "L", 4: "LL"}
# Table II, OASIS column (GPU MB, GPU s); the paper has no LL row at OASIS size (k = 1 is its largest valid shift)
PAPER = {("vm", 1): (3307, 0.156), ("vm", 2): (551, 0.023), ("vm_diff", 1): (3627, 2.165), ("vm_diff", 2): (679, 0.315)}


def merge_rows(results: Sequence[dict]) -> List[dict]:
    """The rows of several runs of this script, a later run's (model, factor) row replacing an earlier one's."""
    rows: Dict[Tuple[str, int], dict] = {}
    for result in results:
        for r in result["rows"]:
            rows[(r["model"], r["factor"])] = r
    return list(rows.values())


def render(device: str, shape: Sequence[int], repeats: int, rows: Sequence[dict], note: str = "") -> str:
    """Table II in markdown: device peak memory and latency, each relative to the same model's H row."""
    lines = [
        f"### Table II on {device}, {'x'.join(map(str, shape))}",
        "",
        f"Inference of one pair, median of {repeats} after a warm-up; memory: device peak on a GPU, else XLA's "
        "footprint (JAX) / peak RSS (PyTorch). XLA footprint: what the compiled program needs (arguments, "
        "outputs, temporaries); a GPU's device peak also holds what the convolution-algorithm search "
        "(XLA's autotuning, `cudnn.benchmark`) allocated.",
        "",
        "| Model | Framework | Memory (MB) | XLA footprint (MB) | Latency (s) | vs H: memory | vs H: time "
        "| paper GPU MB | paper GPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in rows:
        name = f"{NAMES.get(r['model'], r['model'])}-{SUFFIX.get(r['factor'], r['factor'])}"
        if "error" in r:
            lines.append(f"| {name} | - | failed: {' '.join(r['error'])[:80]} | | | | | | |")
            continue
        mem = r.get("device_peak_mb") or r.get("xla_total_mb") or r.get("peak_rss_mb", 0.0)
        xla = f"{r['xla_total_mb']:.0f}" if "xla_total_mb" in r else "-"
        if r["factor"] == 1:
            base[r["model"]] = (mem, r["latency_s"])
        h = base.get(r["model"])
        rel = f"{mem / h[0]:.0%} | {r['latency_s'] / h[1]:.0%}" if h else "- | -"
        paper = PAPER.get((r["model"], r["factor"]), ("-", "-"))
        lines.append(
            f"| {name} | {r.get('framework', '')} | {mem:.0f} | {xla} | {r['latency_s']:.4f} | {rel} | {paper[0]} | {paper[1]} |"
        )
    return "\n".join(lines + ([""] + [note] if note else [])) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 192, 224))
    p.add_argument("--models", nargs="+", default=["vm", "vm_diff", "torch_same"])
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--render",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="measure nothing: rebuild the table from earlier runs' gpu_table.json files (a later "
        "file's rows replace an earlier one's for the same model and factor)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_table")
    args = p.parse_args()
    if args.render:
        results = [json.loads(path.read_text()) for path in args.render]
        last = results[-1]
        note = "Rebuilt by `benchmarks/gpu_table.py --render` from " + ", ".join(f"`{path.name}`" for path in args.render) + "."
        body = {
            "machine": last["machine"],
            "device": last["device"],
            "shape": last["shape"],
            "repeats": last.get("repeats", args.repeats),
            "rows": merge_rows(results),
            "rendered_from": [path.name for path in args.render],
        }
        write(args.out, body, render(body["device"], body["shape"], body["repeats"], body["rows"], note))
        return
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
    write(
        args.out,
        {"machine": m, "device": device, "shape": args.shape, "repeats": args.repeats, "rows": rows},
        render(device, args.shape, args.repeats, rows),
    )


if __name__ == "__main__":
    main()
