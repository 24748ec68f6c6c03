"""The distillation diagnostics (``crd_jax/training/diagnostics.py``) for the shipped LPBA40 models: what a
student on the n = 4 (and n = 2) grid could gain from VM-H's field, and the headroom on training pairs.

    python benchmarks/shipped_diagnostics.py --data-root /path/to/lpba40

Writes ``benchmarks/results/shipped_diagnostics.{md,json}``: on the 30 validation pairs, each shipped model's
Dice and VM-H's field averaged onto the 16x32x16 (n = 4) and 32x64x32 (n = 2) student grids (the ceiling);
on the 16 fixed training pairs of the headroom diagnostic, every model's Dice; the RMS distance of each
low-resolution model's field to VM-H's on those pairs. The models' grid: 64x80x64 on a 64x128x64 canvas.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MODELS = ("lpba40-vm-h", "lpba40-vm-ll", "lpba40-vm-ll-crd", "lpba40-vm-ll-control")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "lpba40"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "shipped_diagnostics")
    args = p.parse_args()

    from configs.lpba40_vm_3d_ll import get_config
    from crd_jax.data import build_datasets, dataset_labels
    from crd_jax.model_io import load_model
    from crd_jax.models import build as mbuild
    from crd_jax.training import diagnostics as diag
    from crd_jax.training.pipeline import evaluation_pairs, network_multiple, write_text

    config = get_config()
    config.data.root = args.data_root
    datasets = build_datasets(config.data, network_multiple(config))
    val, train = datasets["val"], datasets["train"]
    labels = dataset_labels(config.data, val)
    val_pairs, train_pairs = evaluation_pairs(config, val), diag.headroom_pairs(len(train))
    models = {}
    for name in MODELS:
        folder = ROOT / "crd_jax" / "pretrained" / name
        if folder.is_dir():
            params, spec = load_model(folder)
            models[name] = (mbuild.model_from_spec(spec), params)
    out = {"val_pairs": len(val_pairs), "train_pairs": [[train.ids[m], train.ids[f]] for m, f in train_pairs], "models": {}}
    h_model, h_params = models["lpba40-vm-h"]
    for name, (model, params) in models.items():
        row = {
            "val_dice": diag.mean_dice(model, params, val, val_pairs, labels),
            "train_dice": diag.mean_dice(model, params, train, train_pairs, labels),
        }
        if name != "lpba40-vm-h":
            row["distance_to_vm_h"] = diag.field_distance(h_model, h_params, model, params, train, train_pairs)
        out["models"][name] = row
        print(name, row, flush=True)
    out["ceiling"] = {f"n={n}": diag.ceiling(h_model, h_params, val, val_pairs, labels, n)["ceiling_dice"] for n in (4, 2)}
    out["ceiling_train"] = {
        f"n={n}": diag.ceiling(h_model, h_params, train, train_pairs, labels, n)["ceiling_dice"] for n in (4, 2)
    }
    lines = [
        "### Diagnostics of the shipped LPBA40 models (64x80x64 grid)",
        "",
        f"Validation: all {len(val_pairs)} ordered pairs of S35-S40; training: the {len(train_pairs)} fixed pairs of the "
        "headroom diagnostic. Ceiling: VM-H's field averaged over n^3 blocks onto the student grid and upsampled.",
        "",
        "| Model | Val Dice | Train-pair Dice | RMS field distance to VM-H (train pairs, voxels) |",
        "|---|---|---|---|",
    ]
    for name, r in out["models"].items():
        dist = f"{r['distance_to_vm_h']:.3f}" if "distance_to_vm_h" in r else "-"
        lines.append(f"| {name} | {r['val_dice']:.4f} | {r['train_dice']:.4f} | {dist} |")
    for n in (4, 2):
        lines.append(
            f"| VM-H averaged to the n = {n} grid (ceiling) | {out['ceiling'][f'n={n}']:.4f} | "
            f"{out['ceiling_train'][f'n={n}']:.4f} | - |"
        )
    write_text(args.out.with_suffix(".json"), json.dumps(out, indent=1))
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
