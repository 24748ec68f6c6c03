"""What a convolution path of the native kernel does to the field and to Dice, on the 30 ordered LPBA40 validation
pairs (S35-S40) at 1 mm, through the same code as ``crd-jax register``:

* ``--compare bf16``: the opt-in bfloat16 inference (``--bf16``: AMX or AVX512-BF16 CPUs) against float32;
* ``--compare winograd``: the Winograd F(2x2x2, 3x3x3) layers (the default on AVX-512) against the direct kernel.

    python benchmarks/kernel_accuracy.py --compare bf16 --out benchmarks/results/bf16_accuracy
    python benchmarks/kernel_accuracy.py --compare winograd --out benchmarks/results/winograd_accuracy
    python benchmarks/kernel_accuracy.py --compare bf16 --models lpba40-vm-h --max-pairs 4 --out /tmp/acc

Per model: every pair registered on the reference path, then again on the compared one; the largest and the
mean absolute difference of the two fields over all voxels (in voxels), Dice over the 56 structures both ways
with the paired difference (95% bootstrap interval, Wilcoxon p), and the folds. Writes ``<out>.{md,json}``.
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


def voxels(x: float) -> str:
    """A field difference in voxels: four decimals, or two significant digits below 0.001 (Winograd's ~1e-5)."""
    return f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"


def select_path(compare: str, candidate: bool) -> None:
    """The reference path (candidate False) or the compared one, for everything traced from now on."""
    import jax

    from crd_jax.registration import model as registration_model
    from crd_jax.ops import native

    sys.modules["crd_jax.ops.conv"].bf16_inference(compare == "bf16" and candidate)
    native.set_winograd(compare != "winograd" or candidate)
    jax.clear_caches()  # the precision is read when a function is traced: trace everything again
    registration_model.predictor.cache_clear()


def register_all(loaded, pairs, img, seg, labels):
    """Fields, Dice and folds of every pair on the path selected now."""
    from crd_jax import metrics
    from crd_jax.registration.pipeline import register_volumes

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
    from crd_jax.registration.model import load
    from crd_jax.data.io import load_image, load_labels
    from crd_jax.data.layouts import label_protocol
    from crd_jax.ops import native

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lpba40-vm-ll-crd", "lpba40-vm-h"])
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "lpba40")
    p.add_argument("--max-pairs", type=int, default=0)
    p.add_argument("--compare", choices=("bf16", "winograd"), required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.compare == "bf16" and not native.has_bf16():
        raise SystemExit("kernel_accuracy.py --compare bf16 needs the native kernel on a CPU with AVX512-BF16")
    if args.compare == "winograd" and not native.set_winograd(True):
        raise SystemExit("kernel_accuracy.py --compare winograd needs the native kernel's AVX-512 path")
    engine = native.describe_bf16()
    ref, new = {"bf16": ("float32", "bf16"), "winograd": ("direct", "Winograd")}[args.compare]

    labels = label_protocol("lpba40")
    pairs = [(m, f) for f in VAL for m in VAL if m != f][: args.max_pairs or None]
    img = {s: load_image(args.data_root / "images" / f"{s}.nii.gz") for s in VAL}
    seg = {s: load_labels(args.data_root / "labels" / f"{s}.nii.gz") for s in VAL}
    idx = bootstrap_indices(len(pairs))
    m = machine()
    what = (
        f"bfloat16 on {engine}"
        if args.compare == "bf16"
        else "Winograd F(2x2x2, 3x3x3) on the stride-1 3^3 layers against the direct kernel on all of them"
    )
    title = (
        "bfloat16 inference (`--bf16`) against float32"
        if args.compare == "bf16"
        else "Winograd convolutions against the direct kernel"
    )
    lines = [
        f"### {title}, LPBA40 S35-S40 at 1 mm",
        "",
        f"{len(pairs)} ordered pairs, 56 structures; {native.describe()}, {what}, {m.get('cpu', '')}. "
        f"Field differences in voxels over every voxel of every pair; Dice difference = {new} - {ref} over pairs.",
        "",
        f"| Model | Max field difference | Mean field difference | Dice {ref} | Dice {new} | {new} - {ref} [95% CI] | "
        f"Wilcoxon p | Folds {ref} / {new} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for name in args.models:
        loaded = load(pretrained.resolve(name))
        select_path(args.compare, candidate=False)
        f32, d32, k32 = register_all(loaded, pairs, img, seg, labels)
        select_path(args.compare, candidate=True)
        b16, d16, k16 = register_all(loaded, pairs, img, seg, labels)
        diffs = [np.abs(a - b) for a, b in zip(f32, b16)]
        max_diff = float(max(d.max() for d in diffs))
        mean_diff = float(np.mean([d.mean() for d in diffs]))
        cmp = paired(np.asarray(d16), np.asarray(d32), idx)
        summary[name] = {
            "max_field_difference_vox": max_diff,
            "mean_field_difference_vox": mean_diff,
            f"dice_{ref.lower()}": d32,
            f"dice_{new.lower()}": d16,
            f"{new.lower()}_minus_{ref.lower()}": cmp,
            f"folds_{ref.lower()}": k32,
            f"folds_{new.lower()}": k16,
        }
        lines.append(
            f"| {name} | {voxels(max_diff)} | {voxels(mean_diff)} | {np.mean(d32):.4f} | {np.mean(d16):.4f} | "
            f"{cmp['mean']:+.5f} [{cmp['ci'][0]:+.5f}, {cmp['ci'][1]:+.5f}] | {cmp['p']:.2g} | "
            f"{np.mean(k32):.0f} / {np.mean(k16):.0f} |"
        )
        print(lines[-1], flush=True)
    select_path(args.compare, candidate=False)
    write(
        args.out,
        {
            "compare": args.compare,
            "pairs": pairs,
            "models": summary,
            "machine": m,
            "conv": native.describe(),
            "bf16_engine": engine,
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
