"""Reproduce the CRD result of the paper's Table IV (LPBA40) at a CPU budget, and publish the table.

    python benchmarks/reproduce.py --setting 2d          # axial slices, configs/lpba40_vm_2d.py
    python benchmarks/reproduce.py --setting 3d          # volumes at 64x80x64, configs/lpba40_vm_3d_small.py
    python benchmarks/reproduce.py --setting 2d --steps 500 --workdir runs/quick   # a different budget

Trains VM-H, VM-L, the FST teacher and VM-L-CRD with one fixed step budget per stage (the pipeline of
``train.py``; re-running resumes), evaluates them on all ordered pairs of S35-S40 (Dice over the LPBA40
structures, Folds, HD95), measures memory and latency, adds the efficiency of VM-H and VM-L at LPBA40's
full 160x192x160 size, and writes ``results/reproduce_<setting>.{md,json}`` next to the paper's numbers.
The data are in ../shared/data/lpba40 (or --data-root).
"""

from __future__ import annotations

import argparse
import os
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import machine, run_child  # noqa: E402

CONFIGS = {
    "2d": "configs/lpba40_vm_2d.py",
    "3d": "configs/lpba40_vm_3d_small.py",
    "3d-ll": "configs/lpba40_vm_3d_ll.py",
    "3d-ll-rep": "configs/lpba40_vm_3d_ll_replicates.py",
    "3d-ll-long": "configs/lpba40_vm_3d_ll_long.py",
    "3d-ll-exp1": "configs/lpba40_crd_exp1.py",
}
# Long runs live outside the work tree so that they outlive a checkout; re-running the command resumes them.
RUNS = Path(os.environ.get("CRD_RUNS", Path.home() / "crd-runs"))
# Table IV (LPBA40 column) and Section V-A of the paper: Dice (std), GPU MB, GPU s.
PAPER = {
    "VM-H": ("0.691 (0.015)", 3103, 0.125),
    "VM-L": ("0.678 (0.014)", 507, 0.044),
    "VM-L-CRD": ("0.688 (0.016)", 507, 0.044),
}


def load_config(path: Path):
    spec = importlib.util.spec_from_file_location("_reproduce_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _agree(a, b) -> bool:
    """Whether two config trees agree on every key both have (newer code adds fields with defaults)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_agree(a[k], b[k]) for k in set(a) & set(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b))
    return a == b


STAGE_DEFAULTS = {"seed": 0, "augment": ""}  # fields added after the main run wrote its config.json


def reuse_stages(config, source: Path, workdir: Path) -> list:
    """Copies the finished model folders of ``source`` (another run) for every stage of ``config`` that is
    configured the same way there (same stage block up to its label and evaluation, same data, model, loss
    and training settings), so that a variant run does not retrain them. Returns the copied stage names."""
    import shutil

    theirs = json.loads((source / "config.json").read_text())
    ours = json.loads(config.to_json_best_effort())
    for section in ("model", "loss", "train"):
        if not _agree(ours[section], theirs[section]):
            raise SystemExit(f"--reuse {source}: its config.{section} differs from this setting's")
    if not _agree({k: v for k, v in ours["data"].items() if k != "augment"}, theirs["data"]):
        raise SystemExit(f"--reuse {source}: its config.data differs from this setting's")
    copied = []
    for name in config.pipeline:
        block, model = theirs["stages"].get(name), source / "stages" / name / "model"
        if block is None or not model.is_dir() or (workdir / "stages" / name / "model").exists():
            continue
        mine = {k: v for k, v in ours["stages"][name].items() if k not in ("label", "evaluate")}
        if any(mine.get(k, d) != block.get(k, d) for k, d in STAGE_DEFAULTS.items()) or not _agree(mine, block):
            continue
        if not (workdir / "config.json").exists():
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        shutil.copytree(model, workdir / "stages" / name / "model")
        copied.append(name)
    return copied


# The main 3d-ll run's VM-H and VM-LL as shipped in the package (ship_models.py copies their parameters unchanged).
SHIPPED_STAGES = {"vm_h": "lpba40-vm-h", "vm_ll": "lpba40-vm-ll"}


def shipped_main_run(config, dest: Path) -> Path:
    """A run folder holding the main 3d-ll run's finished VM-H and VM-LL, taken from ``crd_jax/pretrained``,
    with that run's config (``configs/lpba40_vm_3d_ll.py``, this setting's data root), for ``--reuse`` when the
    main run's own folder is gone: the variants then retrain neither."""
    import shutil

    main_config = load_config(ROOT / CONFIGS["3d-ll"])
    main_config.data.root = config.data.root
    main_config.workdir = str(dest)
    for stage, name in SHIPPED_STAGES.items():
        model = dest / "stages" / stage / "model"
        if not model.exists():
            shutil.copytree(ROOT / "crd_jax" / "pretrained" / name, model)
    (dest / "config.json").write_text(main_config.to_json_best_effort(indent=2, sort_keys=True))
    return dest


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(CONFIGS), required=True)
    p.add_argument("--steps", type=int, default=0, help="steps per stage (default: the config's)")
    p.add_argument("--workdir", default="")
    p.add_argument("--data-root", default="")
    p.add_argument("--no-full-size", action="store_true", help="skip the 160x192x160 efficiency measurement")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--status", action="store_true", help="print per-stage progress and time left, then exit")
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="another run folder whose identically configured finished stages are copied, not retrained",
    )
    p.add_argument(
        "--reuse-shipped",
        action="store_true",
        help="3d-ll variants: reuse the shipped lpba40-vm-h and lpba40-vm-ll (the main run's VM-H and VM-LL)",
    )
    args = p.parse_args()
    workdir = Path(args.workdir) if args.workdir else RUNS / f"reproduce_lpba40_{args.setting}"
    if args.status:
        from run_status import print_status

        print_status(load_config(ROOT / CONFIGS[args.setting]), workdir, args.steps)
        return

    from crd_jax.config import set_steps
    from crd_jax.training import pipeline

    config = load_config(ROOT / CONFIGS[args.setting])
    if args.steps:
        set_steps(config, args.steps)
    config.workdir = str(workdir)
    if args.data_root:
        config.data.root = args.data_root
    if args.reuse_shipped:
        args.reuse = shipped_main_run(config, RUNS / "shipped_3d-ll")
    if args.reuse:
        print(f"reused from {args.reuse}: {', '.join(reuse_stages(config, args.reuse, workdir)) or 'nothing'}", flush=True)
    t0 = time.time()
    results = pipeline.run(config)
    wall = time.time() - t0
    rows = {r["label"]: r for r in results}

    full = {}
    if not args.no_full_size:
        for n in (1, 2):
            r = run_child("vm", (160, 192, 160), n, "infer", 5)
            full["VM-H" if n == 1 else "VM-L"] = r

    steps = {name: int(config.stages[name].steps) for name in config.pipeline}
    lines = [
        f"### LPBA40, setting {args.setting}: {config.name}",
        "",
        f"Steps per stage: {steps}; batch {config.train.batch_size}; lr {config.train.lr} (halved at 60% and 80%); "
        f"seed {config.seed}. Evaluation: {rows[next(iter(rows))]['num_pairs']} pairs of S35-S40. "
        f"Wall time of this invocation {wall / 60:.0f} min ({machine().get('cpu', '')}, {machine()['cpus']} cores; "
        "finished stages are not re-run).",
        "",
        "| Model | Dice (ours) | Folds | HD95 (mm) | Memory (MB) | Latency (s) | Dice (paper) | GPU MB (paper) | GPU s (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = next(iter(rows.values()))
    lines.append(f"| Identity | {first['dice_before_mean']:.3f} ({first['dice_before_std']:.3f}) | - | - | - | - | - | - | - |")
    for label, r in rows.items():
        paper = PAPER.get(label, ("-", "-", "-"))
        hd = f"{r['hd95_mean']:.2f} ({r['hd95_std']:.2f})" if "hd95_mean" in r else "-"
        lines.append(
            f"| {label} | {r['dice_mean']:.3f} ({r['dice_std']:.3f}) | {r['folds_mean']:.1f} ({r['folds_std']:.1f}) | {hd} "
            f"| {r.get('memory_mb', float('nan')):.1f} | {r['latency_s']:.4f} | {paper[0]} | {paper[1]} | {paper[2]} |"
        )
    if "VM-H" in rows and "VM-L-CRD" in rows:
        h, l = rows["VM-H"], rows["VM-L-CRD"]
        lines += [
            "",
            f"At this setting's resolution VM-L-CRD uses {l['memory_mb'] / h['memory_mb']:.0%} of VM-H's memory and "
            f"{l['latency_s'] / h['latency_s']:.0%} of its time (paper: 16% and 35%).",
        ]
    if full and all("error" not in r for r in full.values()):
        h, l = full["VM-H"], full["VM-L"]
        lines.append(
            f"At LPBA40's full 160x192x160: VM-H {h['latency_s']:.2f} s, {h['xla_total_mb']:.0f} MB (XLA), peak RSS {h['peak_rss_mb']:.0f} MB; "
            f"VM-L(-CRD) {l['latency_s']:.2f} s, {l['xla_total_mb']:.0f} MB, {l['peak_rss_mb']:.0f} MB: "
            f"{l['xla_total_mb'] / h['xla_total_mb']:.0%} of the memory and {l['latency_s'] / h['latency_s']:.0%} of the time."
        )
    markdown = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"reproduce_{args.setting}"
    payload = {
        "setting": args.setting,
        "config": json.loads(config.to_json_best_effort()),
        "wall_s": wall,
        "results": [{k: v for k, v in r.items() if k != "pairs"} for r in results],
        "full_size": full,
        "machine": machine(),
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
