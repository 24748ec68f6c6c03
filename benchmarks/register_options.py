"""What ``--affine`` and ``--io-steps`` buy on real data: a shipped model on the 30 ordered LPBA40 validation
pairs (S35-S40) at the original 160x192x160, 1 mm, through the same code as ``crd-jax register``.

    python benchmarks/register_options.py                          # lpba40-vm-ll-crd, all 30 pairs
    python benchmarks/register_options.py --model lpba40-vm-h --max-pairs 4 --out /tmp/options

Per option set (none, ``--io-steps 50``, ``--affine``, both): mean (std) Dice over the 56 structures, the
paired difference to no option with a 95% bootstrap interval and a Wilcoxon p, Folds (central differences)
and the median in-process seconds per pair (compiled once, first pair excluded). Also the wall time of one
fresh ``crd-jax register --affine --io-steps 50`` process on the first pair. LPBA40 is affinely pre-aligned,
so ``--affine`` can only show its cost and that it does no harm here. Writes ``<out>/register_options.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

VAL = [f"S{i}" for i in range(35, 41)]
OPTIONS = {"none": {}, "--io-steps 50": {"io_steps": 50}, "--affine": {"affine": "ncc"},
           "--affine --io-steps 50": {"affine": "ncc", "io_steps": 50}}


def main():
    from common import machine
    from lpba40_report import bootstrap_indices, paired

    from crd_jax import metrics, pretrained
    from crd_jax.cli.registration import load, register_volumes
    from crd_jax.data.io import load_image, load_labels
    from crd_jax.data.layouts import label_protocol

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lpba40-vm-ll-crd")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "lpba40")
    p.add_argument("--max-pairs", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    loaded = load(pretrained.resolve(args.model))
    labels = label_protocol("lpba40")
    pairs = [(m, f) for f in VAL for m in VAL if m != f][: args.max_pairs or None]
    img = {s: load_image(args.data_root / "images" / f"{s}.nii.gz") for s in VAL}
    seg = {s: load_labels(args.data_root / "labels" / f"{s}.nii.gz") for s in VAL}
    rows = {name: {"dice": [], "folds": [], "seconds": []} for name in OPTIONS}
    before = []
    for i, (m, f) in enumerate(pairs):
        before.append(float(np.nanmean(metrics.dice(seg[m].data, seg[f].data, labels))))
        for name, kw in OPTIONS.items():
            t0 = time.perf_counter()
            result, _ = register_volumes(loaded, img[f], img[m], seg[m], **kw)
            rows[name]["seconds"].append(time.perf_counter() - t0)
            rows[name]["dice"].append(float(np.nanmean(metrics.dice(result["warped_seg"], seg[f].data, labels))))
            rows[name]["folds"].append(int(metrics.count_folds(result["disp"])))
        print(f"pair {i + 1}/{len(pairs)} {m}->{f}: " + ", ".join(f"{n} {r['dice'][-1]:.4f}" for n, r in rows.items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        m, f = pairs[0]
        cmd = [sys.executable, "-m", "crd_jax", "register", "--model", args.model, "--affine", "--io-steps", "50",
               "--fixed", str(args.data_root / "images" / f"{f}.nii.gz"), "--moving", str(args.data_root / "images" / f"{m}.nii.gz"),
               "--moving-seg", str(args.data_root / "labels" / f"{m}.nii.gz"), "--out-dir", str(Path(tmp) / "out")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_wall = time.perf_counter() - t0

    idx = bootstrap_indices(len(pairs))
    base = np.asarray(rows["none"]["dice"])
    lines = [f"### `--affine` and `--io-steps` with {args.model} on LPBA40 S35-S40 at 1 mm", "",
             f"{len(pairs)} ordered pairs, 56 structures; Dice before registration {np.mean(before):.4f} ({np.std(before):.4f}). "
             f"Seconds: median in-process time per pair after the first ({machine().get('cpu', '')}, {machine()['cpus']} cores).",
             "", "| Options | Dice | vs none: mean [95% CI] | Wilcoxon p | Folds | s per pair |", "|---|---|---|---|---|---|"]
    summary = {}
    for name, r in rows.items():
        d = np.asarray(r["dice"])
        cmp = paired(d, base, idx) if name != "none" else None
        secs = float(np.median(r["seconds"][1:] or r["seconds"]))
        summary[name] = {"dice_mean": float(d.mean()), "dice_std": float(d.std()), "vs_none": cmp,
                         "folds_mean": float(np.mean(r["folds"])), "seconds_median": secs, "dice": r["dice"]}
        diff = "-" if cmp is None else f"{cmp['mean']:+.4f} [{cmp['ci'][0]:+.4f}, {cmp['ci'][1]:+.4f}]"
        pval = "-" if cmp is None else f"{cmp['p']:.2g}"
        lines.append(f"| {name} | {d.mean():.4f} ({d.std():.4f}) | {diff} | {pval} | {np.mean(r['folds']):.0f} | {secs:.1f} |")
    lines += ["", f"One fresh `crd-jax register --model {args.model} --affine --io-steps 50` process on {pairs[0][0]} -> "
              f"{pairs[0][1]} (interpreter start to last file): {cli_wall:.1f} s wall."]
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "register_options.md").write_text(md)
    (args.out / "register_options.json").write_text(json.dumps(
        {"model": args.model, "pairs": pairs, "dice_before": before, "options": summary, "cli_wall_s": cli_wall,
         "machine": machine()}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
