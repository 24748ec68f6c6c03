"""What the opt-in bfloat16 inference (``--bf16``: AMX or AVX512-BF16 CPUs) does to the field and to Dice, on the 30
ordered LPBA40 validation pairs (S35-S40) at 1 mm, through the same code as ``crd-jax register``.

    python benchmarks/bf16_accuracy.py                                  # the shipped LPBA40 models
    python benchmarks/bf16_accuracy.py --models lpba40-vm-h --max-pairs 4 --out /tmp/bf16_accuracy

Per model: every pair registered with float32 convolutions, then again with bfloat16 inputs and weights
(float32 sums); the largest and the mean absolute difference of the two fields over all voxels (in voxels),
Dice over the 56 structures both ways with the paired difference (95% bootstrap interval, Wilcoxon p), and
the folds. Writes ``<out>.{md,json}`` (default ``benchmarks/results/bf16_accuracy``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

VAL = [f"S{i}" for i in range(35, 41)]


def register_all(loaded, pairs, img, seg, labels, bf16: bool):
    """Fields, Dice and folds of every pair with the convolutions in float32 or bfloat16."""
    import jax

    from crd_jax import inference, metrics
    from crd_jax.cli.registration import register_volumes

    sys.modules["crd_jax.ops.conv"].bf16_inference(bf16)
    jax.clear_caches()  # the precision is read when a function is traced: trace everything again
    inference.predictor.cache_clear()
    fields, dice, folds = [], [], []
    for m, f in pairs:
        result, _ = register_volumes(loaded, img[f], img[m], seg[m])
        fields.append(np.asarray(result["disp"], np.float32))
        dice.append(float(np.nanmean(metrics.dice(result["warped_seg"], seg[f].data, labels))))
        folds.append(int(metrics.count_folds(result["disp"])))
    return fields, dice, folds


def main():
    from common import machine, write
    from lpba40_report import bootstrap_indices, paired

    from crd_jax import pretrained
    from crd_jax.cli.registration import load
    from crd_jax.data.io import load_image, load_labels
    from crd_jax.data.layouts import label_protocol
    from crd_jax.ops import native

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lpba40-vm-ll-crd", "lpba40-vm-h"])
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "lpba40")
    p.add_argument("--max-pairs", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bf16_accuracy")
    args = p.parse_args()
    if not native.has_bf16():
        raise SystemExit("bf16_accuracy.py needs the native kernel on a CPU with AVX512-BF16")
    engine = native.describe_bf16()

    labels = label_protocol("lpba40")
    pairs = [(m, f) for f in VAL for m in VAL if m != f][: args.max_pairs or None]
    img = {s: load_image(args.data_root / "images" / f"{s}.nii.gz") for s in VAL}
    seg = {s: load_labels(args.data_root / "labels" / f"{s}.nii.gz") for s in VAL}
    idx = bootstrap_indices(len(pairs))
    m = machine()
    lines = [f"### bfloat16 inference (`--bf16`) against float32, LPBA40 S35-S40 at 1 mm", "",
             f"{len(pairs)} ordered pairs, 56 structures; {native.describe()}, bfloat16 on {engine}, {m.get('cpu', '')}. "
             "Field differences "
             "in voxels over every voxel of every pair; Dice difference = bf16 - float32 over pairs.", "",
             "| Model | Max field difference | Mean field difference | Dice float32 | Dice bf16 | bf16 - float32 [95% CI] | "
             "Wilcoxon p | Folds float32 / bf16 |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in args.models:
        loaded = load(pretrained.resolve(name))
        f32, d32, k32 = register_all(loaded, pairs, img, seg, labels, bf16=False)
        b16, d16, k16 = register_all(loaded, pairs, img, seg, labels, bf16=True)
        diffs = [np.abs(a - b) for a, b in zip(f32, b16)]
        max_diff = float(max(d.max() for d in diffs))
        mean_diff = float(np.mean([d.mean() for d in diffs]))
        cmp = paired(np.asarray(d16), np.asarray(d32), idx)
        summary[name] = {"max_field_difference_vox": max_diff, "mean_field_difference_vox": mean_diff,
                         "dice_float32": d32, "dice_bf16": d16, "bf16_minus_float32": cmp,
                         "folds_float32": k32, "folds_bf16": k16}
        lines.append(f"| {name} | {max_diff:.4f} | {mean_diff:.5f} | {np.mean(d32):.4f} | {np.mean(d16):.4f} | "
                     f"{cmp['mean']:+.5f} [{cmp['ci'][0]:+.5f}, {cmp['ci'][1]:+.5f}] | {cmp['p']:.2g} | "
                     f"{np.mean(k32):.0f} / {np.mean(k16):.0f} |")
        print(lines[-1], flush=True)
    write(args.out, {"pairs": pairs, "models": summary, "machine": m, "conv": native.describe(), "bf16_engine": engine},
          "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
