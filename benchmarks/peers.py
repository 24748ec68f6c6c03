"""crd-jax against PyTorch peers on the same machine, in the same invocation, alternating, one fresh
process per configuration (a noisy machine then hits both sides alike).

    pip install -e '.[peers]'           # torch 2.13.0 (CPU), voxelmorph 0.2, MONAI
    python benchmarks/peers.py
    python benchmarks/peers.py --quick   # vm vs torch_same only, 3 runs each (a few minutes)

Pairs compared (network input sizes H 160x192x224, L 80x96x112, LL 48x48x64; batch 1):

* ``vm`` (crd-jax) vs ``torch_same``: the paper's VM (stride-2 encoder convs, VoxelMorph-2 decoder, 300,547
  parameters) written in plain PyTorch: the like-with-like comparison.
* ``vxmdense`` (crd-jax, ``encoder_pooling="maxpool"``) vs ``torch_vxmdense``: voxelmorph 0.2's ``VxmDense``
  (stride-1 convs + max pooling, full-resolution decoder convs, 327,331 parameters), as users run it.
* ``monai_voxelmorph``: MONAI's ``VoxelMorph`` (channels 16,32,32,32,32,32; its own layout) for reference.

PyTorch runs with ``channels_last_3d`` (its fastest CPU layout here) and all cores. The training step is
forward + backward of NCC (9^3) + gradient loss; voxelmorph's NCC is a dense 9^3 box convolution, ours a
separable box sum (reduce_window), which is part of the measured difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import HERE, fmt, fmt_latency, machine, run_child, write

SIZES = {"H": (160, 192, 224), "L": (80, 96, 112), "LL": (48, 48, 64)}
PAIRS = [("vm", "torch_same"), ("vxmdense", "torch_vxmdense"), (None, "monai_voxelmorph")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--infer-sizes", nargs="*", default=["H", "L", "LL"])
    p.add_argument("--train-sizes", nargs="*", default=["L", "LL"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="model names to leave out")
    p.add_argument("--quick", action="store_true", help="only vm vs torch_same, 3 runs each")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also bfloat16 inference: crd-jax's opt-in --bf16 (AMX or AVX512-BF16) against PyTorch's autocast",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "peers")
    args = p.parse_args()
    if args.quick:
        args.skip = sorted(set(args.skip) | {"vxmdense", "torch_vxmdense", "monai_voxelmorph"})
        args.repeats = min(args.repeats, 3)
    from crd_jax.ops import native

    conv = native.describe()
    bf16_engine = native.describe_bf16() or "no bfloat16 on this CPU"

    rows = []
    for mode, sizes in (("infer", args.infer_sizes), ("train", args.train_sizes)):
        for size in sizes:
            for ours, peer in PAIRS:
                if mode == "train" and peer == "monai_voxelmorph":
                    continue
                for model in (ours, peer):  # alternate: ours, then its peer
                    if model is None or model in args.skip:
                        continue
                    r = run_child(model, SIZES[size], 1, mode, args.repeats, log=print)
                    r["size"] = size
                    rows.append(r)
                    if mode == "infer" and args.bf16:  # both sides: ours --bf16, PyTorch's autocast
                        r = run_child(model, SIZES[size], 1, mode, args.repeats, log=print, extra=["--bf16"])
                        r.update(size=size, model=f"{model} (bf16)")
                        rows.append(r)

    lines = [
        f"{machine().get('cpu', '')}, {machine()['cpus']} cores; batch 1; median (min-max) of {args.repeats} runs after a warm-up; "
        f"peak RSS of a fresh process per configuration; crd-jax convolution: {conv}."
        + (
            f" Rows `(bf16)`: bfloat16 inference on both sides, compared with each other: crd-jax with `--bf16` "
            f"(bfloat16 inputs and weights, float32 sums; {bf16_engine}), PyTorch under "
            '`torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN\'s bfloat16 convolutions).'
            if args.bf16
            else ""
        ),
        "",
        "| Mode | Size | Model | Framework | Latency (s) | Peak RSS (MB) | peer / crd-jax latency | peer / crd-jax RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(peer, ours, key):
        return f"{peer[key] / ours[key]:.2f}x" if ours and "error" not in peer and "error" not in ours else ""

    for r in rows:
        ours = None
        base, suffix = (r["model"][: -len(" (bf16)")], " (bf16)") if r["model"].endswith(" (bf16)") else (r["model"], "")
        for a, b in PAIRS:
            if base == b and a is not None:  # a peer's row: against ours in the same precision
                ours = next(
                    (q for q in rows if q["model"] == a + suffix and q["size"] == r["size"] and q["mode"] == r["mode"]), None
                )
        ratio_t, ratio_m = ratio(r, ours, "latency_s"), ratio(r, ours, "peak_rss_mb")
        lines.append(
            f"| {r['mode']} | {r['size']} | {r['model']} | {r['framework'] if 'framework' in r else '?'} | {fmt_latency(r)} "
            f"| {fmt(r.get('peak_rss_mb'))} | {ratio_t} | {ratio_m} |"
        )
    write(args.out, {"machine": machine(), "conv": conv, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
