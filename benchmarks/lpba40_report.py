"""The LPBA40 3-D reproduction report: every model of a finished (or partly finished) run, on all 30 ordered
validation pairs of S35-S40, at the models' grid and at the original 1 mm grid, with paired statistics.

    python benchmarks/lpba40_report.py                                  # ~/crd-runs/reproduce_lpba40_3d-ll
    python benchmarks/lpba40_report.py --workdir DIR --max-pairs 2 --out /tmp/report   # a quick look

Per model: Dice (mean (std) over pairs of the mean over the 56 structures), Folds with central differences
(VoxelMorph) and forward differences (the authors' code), HD95 (mm), SDlogJ, XLA memory and latency. At 1 mm
each model registers the original 160x192x160 volumes through the same path as ``crd-jax register``
(inputs resampled onto the model's grid, the field mapped back and upsampled, labels warped at 1 mm).
Comparisons (H vs L, CRD vs L, CRD vs H, CRD vs the longer-trained L control): the paired mean difference of
Dice with a 95% bootstrap interval (10,000 resamples of pairs) and a Wilcoxon signed-rank p-value; the
fraction of the H-L gap that CRD recovers, with its bootstrap interval. The 30 ordered pairs reuse 6
subjects, so they are not independent: the intervals are optimistic. A classical baseline (SimpleITK
diffeomorphic demons, when SimpleITK is installed) runs on the same pairs at the models' grid.

Writes ``<out>/reproduce_3d_ll.{md,json}`` and ``<out>/reproduce_3d_ll_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

RUNS = Path(os.environ.get("CRD_RUNS", Path.home() / "crd-runs"))
CONFIG = ROOT / "configs" / "lpba40_vm_3d_ll.py"
ROLES = {"high": "vm_h", "low": "vm_ll", "crd": "vm_ll_crd", "control": "vm_ll_long", "teacher": "fst"}


# --- statistics ----------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> dict:
    """Mean of ``a - b`` with a 95% percentile-bootstrap interval and a two-sided Wilcoxon signed-rank p."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    boot = d[idx].mean(axis=1)
    p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {
        "mean": float(d.mean()),
        "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "p": p,
        "n": int(d.size),
    }


def gap_recovered(high, low, crd, idx) -> dict:
    """``(CRD - L) / (H - L)`` on the mean Dice, with its bootstrap interval (undefined if H <= L)."""
    high, low, crd = (np.asarray(x, np.float64) for x in (high, low, crd))
    gap = high.mean() - low.mean()
    boot_gap = high[idx].mean(1) - low[idx].mean(1)
    boot = (crd[idx].mean(1) - low[idx].mean(1)) / np.where(np.abs(boot_gap) > 1e-12, boot_gap, np.nan)
    return {
        "fraction": float((crd.mean() - low.mean()) / gap) if abs(gap) > 1e-12 else float("nan"),
        "ci": [float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))],
        "gap": float(gap),
    }


# --- evaluation ----------------------------------------------------------------------------------------------


def load_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lpba40_3d_ll", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def full_resolution_rows(model_dir: Path, subjects, pairs, labels, hd95: bool = True):
    """Registers the original 1 mm volumes as ``crd-jax register`` does and scores the warped labels."""
    from crd_jax import metrics
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import register_volumes
    from crd_jax.data.io import load_image, load_labels

    loaded = load(model_dir)
    cache = {}

    def volume(i):
        if i not in cache:
            cache[i] = (load_image(subjects[i].image), load_labels(subjects[i].labels))
        return cache[i]

    rows = []
    for mi, fi in pairs:
        (moving, moving_seg), (fixed, fixed_seg) = volume(mi), volume(fi)
        t = time.perf_counter()
        result, _ = register_volumes(loaded, fixed, moving, moving_seg)
        seconds = time.perf_counter() - t
        disp = result["disp"]
        row = {
            "moving": subjects[mi].id,
            "fixed": subjects[fi].id,
            "seconds": seconds,
            "dice": float(np.nanmean(metrics.dice(result["warped_seg"], fixed_seg.data, labels))),
            "folds": metrics.count_folds(disp),
            "folds_forward": metrics.count_folds(disp, "forward"),
            "sdlogj": metrics.sdlogj(disp),
        }
        if hd95:
            row["hd95"] = float(np.nanmean(metrics.hd95(result["warped_seg"], fixed_seg.data, labels, fixed.spacing)))
        rows.append(row)
    return rows


def demons_rows(dataset, pairs, labels, iterations: int = 50, sigma: float = 1.5):
    """SimpleITK's diffeomorphic demons on the models' grid (histogram-matched moving image), as a classical
    baseline; ``None`` when SimpleITK is missing."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    from crd_jax import metrics
    from crd_jax.ops.spatial import warp
    import jax.numpy as jnp

    rows = []
    for mi, fi in pairs:
        fixed = sitk.GetImageFromArray(dataset.image(fi).astype(np.float32))
        moving = sitk.GetImageFromArray(dataset.image(mi).astype(np.float32))
        moving = sitk.HistogramMatching(moving, fixed, 256, 7, True)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetStandardDeviations(sigma)
        t = time.perf_counter()
        field = demons.Execute(fixed, moving)
        seconds = time.perf_counter() - t
        # SimpleITK arrays are (z, y, x) with vectors (x, y, z): back to our (x, y, z) axes and components
        disp = sitk.GetArrayFromImage(field)[..., ::-1]
        seg = dataset.labels(mi)
        warped = np.asarray(warp(jnp.asarray(seg, jnp.int32)[None, ..., None], jnp.asarray(disp, jnp.float32)[None], order=0))[
            0, ..., 0
        ]
        src = dataset.placement.restore
        rows.append(
            {
                "moving": dataset.ids[mi],
                "fixed": dataset.ids[fi],
                "seconds": seconds,
                "dice": float(np.nanmean(metrics.dice(src(warped, fill=0), src(dataset.labels(fi), fill=0), labels))),
                "folds": metrics.count_folds(src(disp)),
                "folds_forward": metrics.count_folds(src(disp), "forward"),
            }
        )
    return rows


# --- the run's own record ------------------------------------------------------------------------------------


def run_log(workdir: Path, pipeline):
    """Per stage: steps logged, training wall time (the sum of logged intervals, so resumes do not count
    idle time), final validation Dice, and the validation curve."""
    records = []
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    out = {}
    for name in pipeline:
        rows = [r for r in records if r.get("stage") == name]
        steps = sorted({int(r["step"]) for r in rows if "steps_per_s" in r})
        wall, previous = 0.0, 0
        speed = {int(r["step"]): r["steps_per_s"] for r in rows if "steps_per_s" in r}
        for s in steps:
            wall += (s - previous) / max(speed[s], 1e-9)
            previous = s
        curve = sorted({int(r["step"]): float(r["val/dice"]) for r in rows if "val/dice" in r}.items())
        out[name] = {
            "steps": steps[-1] if steps else 0,
            "train_wall_s": wall,
            "val_curve": curve,
            "final_val_dice": curve[-1][1] if curve else None,
        }
    return out


def plot_curves(log, labels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, entry in log.items():
        if entry["val_curve"]:
            steps, dice = zip(*entry["val_curve"])
            ax.plot(steps, dice, marker="o", label=labels.get(name, name))
    ax.set_xlabel("step of the stage")
    ax.set_ylabel("validation Dice (4 pairs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- report --------------------------------------------------------------------------------------------------


def fmt(mean, std, digits=3):
    return f"{mean:.{digits}f} ({std:.{digits}f})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=RUNS / "reproduce_lpba40_3d-ll")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--max-pairs", type=int, default=0)
    p.add_argument("--no-full-res", action="store_true")
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--no-classical", action="store_true")
    args = p.parse_args()

    from crd_jax.data import build_datasets, dataset_labels, eval_pairs
    from crd_jax.training.pipeline import network_multiple

    config = load_config()
    datasets = build_datasets(config.data, network_multiple(config))
    val = datasets["val"]
    labels = dataset_labels(config.data, val)
    pairs = eval_pairs(len(val), "all")
    if args.max_pairs > 0:
        pairs = pairs[: args.max_pairs]
    keep = {(val.ids[m], val.ids[f]) for m, f in pairs}

    models, per_pair = {}, {}
    for name in config.pipeline:
        stage_dir = args.workdir / "stages" / name
        if not (stage_dir / "eval.json").exists():
            continue
        ev = json.loads((stage_dir / "eval.json").read_text())
        rows = [r for r in ev["pairs"] if (r["moving"], r["fixed"]) in keep]
        entry = {k: v for k, v in ev.items() if k != "pairs"}
        entry["grid"] = {
            "dice": [r["dice"] for r in rows],
            "folds": [r["folds"] for r in rows],
            "hd95": [r.get("hd95", float("nan")) for r in rows],
            "sdlogj": [r["sdlogj"] for r in rows],
            "dice_before": [r["dice_before"] for r in rows],
        }
        if not args.no_full_res:
            print(f"[{name}] registering {len(pairs)} pairs at 1 mm", flush=True)
            full = full_resolution_rows(stage_dir / "model", val.subjects, pairs, labels, hd95=not args.no_hd95)
            entry["full"] = {
                k: [r.get(k, float("nan")) for r in full] for k in ("dice", "folds", "folds_forward", "hd95", "sdlogj", "seconds")
            }
        models[name] = entry
        per_pair[name] = rows

    classical = None if args.no_classical else demons_rows(val, pairs, labels)
    idx = bootstrap_indices(len(pairs))
    grids = ["grid"] + ([] if args.no_full_res else ["full"])
    comparisons = {}
    r = ROLES
    wanted = [
        ("H vs L", r["high"], r["low"]),
        ("CRD vs L", r["crd"], r["low"]),
        ("CRD vs H", r["crd"], r["high"]),
        ("CRD vs L (+steps)", r["crd"], r["control"]),
        ("L (+steps) vs L", r["control"], r["low"]),
    ]
    for grid in grids:
        for title, a, b in wanted:
            if a in models and b in models:
                comparisons[f"{title} @ {grid}"] = paired(models[a][grid]["dice"], models[b][grid]["dice"], idx)
        if all(x in models for x in (r["high"], r["low"], r["crd"])):
            comparisons[f"gap recovered @ {grid}"] = gap_recovered(
                models[r["high"]][grid]["dice"], models[r["low"]][grid]["dice"], models[r["crd"]][grid]["dice"], idx
            )
    log = run_log(args.workdir, config.pipeline)
    labels_of = {n: m["label"] for n, m in models.items()}

    # --- markdown ---
    first = next(iter(models.values()), None)
    lines = [f"### LPBA40 3-D, n = 4: {config.name}", ""]
    if first is None:
        lines.append("No stage has finished yet.")
    else:
        before = np.asarray(first["grid"]["dice_before"])
        lines += [
            f"{len(pairs)} ordered pairs of S35-S40; Dice over the 56 structures, mean (std) over pairs. 'grid': the "
            "models' 64x80x64 grid (2.5 mm); '1 mm': the original volumes through `crd-jax register`.",
            "",
            "| Model | Dice (grid) | Dice (1 mm) | HD95 mm (1 mm) | Folds central / forward (1 mm) | SDlogJ | Memory (MB) | Latency (s) | Params |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| Identity | {fmt(before.mean(), before.std())} | - | - | - | - | - | - | - |",
        ]
        for name, m in models.items():
            g = m["grid"]
            f = m.get("full")
            d1 = fmt(np.mean(f["dice"]), np.std(f["dice"])) if f else "-"
            hd = fmt(np.nanmean(f["hd95"]), np.nanstd(f["hd95"]), 2) if f and not args.no_hd95 else "-"
            folds = f"{np.mean(f['folds']):.0f} / {np.mean(f['folds_forward']):.0f}" if f else f"{np.mean(g['folds']):.0f} / -"
            lines.append(
                f"| {m['label']} | {fmt(np.mean(g['dice']), np.std(g['dice']))} | {d1} | {hd} | {folds} "
                f"| {np.mean(g['sdlogj']):.3f} | {m.get('memory_mb', float('nan')):.1f} | {m['latency_s']:.4f} "
                f"| {m['parameters']:,} |"
            )
        if classical:
            dc = np.asarray([row["dice"] for row in classical])
            lines.append(
                f"| Demons (SimpleITK, grid) | {fmt(dc.mean(), dc.std())} | - | - | "
                f"{np.mean([row['folds'] for row in classical]):.0f} / - | - | - | "
                f"{np.median([row['seconds'] for row in classical]):.2f} | - |"
            )
        lines += ["", "| Comparison (Dice) | mean difference | 95% bootstrap CI | Wilcoxon p |", "|---|---|---|---|"]
        for title, c in comparisons.items():
            if "fraction" in c:
                lines.append(
                    f"| {title} | {c['fraction']:.2f} of a gap of {c['gap']:+.4f} | [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] | - |"
                )
            else:
                lines.append(f"| {title} | {c['mean']:+.4f} | [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] | {c['p']:.2g} |")
    lines += ["", "| Stage | Steps | Training wall time (min) | Final val Dice (4 pairs) |", "|---|---|---|---|"]
    for name, e in log.items():
        final = f"{e['final_val_dice']:.4f}" if e["final_val_dice"] is not None else "-"
        lines.append(f"| {name} | {e['steps']} | {e['train_wall_s'] / 60:.1f} | {final} |")
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reproduce_3d_ll.md").write_text(markdown)
    (args.out / "reproduce_3d_ll.json").write_text(
        json.dumps(
            {"pairs": len(pairs), "models": models, "comparisons": comparisons, "classical": classical, "run_log": log},
            indent=1,
            default=float,
        )
    )
    plot_curves(log, labels_of, args.out / "reproduce_3d_ll_curves.png")
    print(markdown)


if __name__ == "__main__":
    main()
