"""The authors' OASIS student through ``crd-jax convert-official`` on LPBA40, before and after its training space
was recorded (issue 30, item 6): the first ordered validation pairs of S35-S40 at 1 mm, through the code of
``crd-jax register``.

    nice -n 10 python benchmarks/official_space.py                     # 6 pairs
    python benchmarks/official_space.py --max-pairs 3 --out /tmp/official

"before": the converted folder as the converter wrote it until then (no ``geometry``/``intensity`` record: the
LPBA40 arrays reach the network in their stored LPS order); "after": as it writes it now (reoriented to LIA,
the OASIS training space, at 1 mm). Each with the default options (affine pre-alignment) and with
``--no-affine``. Per configuration: mean (std) Dice over the 56 structures, voxels folding (det J <= 0, central
differences) in % of the volume, and on how many pairs the out-of-domain check fires (what a fresh process per
pair would print; the check is :func:`crd_jax.registration.checks.out_of_domain`). Writes
``<out>/official_space.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
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
OPTIONS = {"default (affine)": {"affine": "ncc"}, "--no-affine": {}}


def convert_both(checkpoint: Path, root: Path):
    """``(before, after)`` model folders from ``checkpoint``: without and with the training-space record."""
    from crd_jax.interop import official
    from crd_jax.interop.torch_legacy import load_legacy_checkpoint
    from crd_jax.model_io import save_model

    params, spec = official.convert(load_legacy_checkpoint(checkpoint), "student", source=str(checkpoint))
    old = json.loads(json.dumps(spec))
    for key in ("geometry", "intensity"):
        old["preprocessing"].pop(key)
    old.pop("card")
    save_model(root / "before", params, old)
    save_model(root / "after", params, spec)
    return root / "before", root / "after"


def main():
    from common import machine, write

    from crd_jax import metrics
    from crd_jax.data.io import load_image, load_labels
    from crd_jax.data.layouts import label_protocol
    from crd_jax.registration import checks
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import register_volumes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT.parent / "shared" / "official_crd" / "student_oasis.pth")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "lpba40")
    p.add_argument("--max-pairs", type=int, default=6)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    labels = label_protocol("lpba40")
    pairs = [(m, f) for f in VAL for m in VAL if m != f][: args.max_pairs]  # (moving, fixed), as register_options
    subjects = sorted({s for pair in pairs for s in pair})
    img = {s: load_image(args.data_root / "images" / f"{s}.nii.gz") for s in subjects}
    seg = {s: load_labels(args.data_root / "labels" / f"{s}.nii.gz") for s in subjects}
    load_start = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = dict(zip(("before", "after"), convert_both(args.checkpoint, Path(tmp))))
        for version, folder in folders.items():
            loaded = load(folder)
            for option, kw in OPTIONS.items():
                r = rows[f"{version}, {option}"] = {"dice": [], "folds_pct": [], "seconds": [], "warned": [], "reasons": []}
                for m, f in pairs:
                    reason = checks.out_of_domain(loaded.spec, (img[f], img[m]))
                    t0 = time.perf_counter()
                    result, _ = register_volumes(loaded, img[f], img[m], seg[m], **kw)
                    r["seconds"].append(time.perf_counter() - t0)
                    r["dice"].append(float(np.nanmean(metrics.dice(result["warped_seg"], seg[f].data, labels))))
                    r["folds_pct"].append(100.0 * int(metrics.count_folds(result["disp"])) / img[f].data.size)
                    r["warned"].append(reason is not None)
                    r["reasons"].append(reason)
                    print(
                        f"{version}, {option}, {m}->{f}: Dice {r['dice'][-1]:.4f}, folds {r['folds_pct'][-1]:.3f}%, "
                        f"out of domain: {reason}",
                        flush=True,
                    )
    before = [float(np.nanmean(metrics.dice(seg[m].data, seg[f].data, labels))) for m, f in pairs]
    n = len(pairs)
    lines = [
        "### The authors' OASIS student (`convert-official`) on LPBA40 S35-S40 at 1 mm, without and with its training space",
        "",
        f"First {n} ordered pairs ({', '.join(f'{m}->{f}' for m, f in pairs)}), 56 structures; Dice before "
        f'registration {np.mean(before):.4f}. "before": model.json without the training-space record (arrays '
        'in LPBA40\'s stored LPS order); "after": with it (reoriented to the OASIS LIA space, 1 mm). Folds: '
        "voxels with det J <= 0 (central differences), % of the volume. Out of domain: pairs on which the "
        "once-per-process warning fires in a fresh process. Seconds: mean in-process time per pair "
        f"(1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on "
        f"{machine()['cpus']} cores: shared machine, seconds inflated).",
        "",
        "| Model.json, options | Dice | Folds % | out of domain | s per pair |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for name, r in rows.items():
        d = np.asarray(r["dice"])
        summary[name] = {
            "dice_mean": float(d.mean()),
            "dice_std": float(d.std()),
            "folds_pct_mean": float(np.mean(r["folds_pct"])),
            "warned": int(sum(r["warned"])),
            **r,
        }
        lines.append(
            f"| {name} | {d.mean():.4f} ({d.std():.4f}) | {np.mean(r['folds_pct']):.3f} | "
            f"{sum(r['warned'])}/{n} | {np.mean(r['seconds']):.1f} |"
        )
    write(
        args.out / "official_space",
        {
            "checkpoint": args.checkpoint.name,
            "pairs": pairs,
            "dice_before": before,
            "configurations": summary,
            "machine": machine(),
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
