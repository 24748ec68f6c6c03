"""``crd-jax evaluate``: Dice, HD95, folds, SDlogJ, time and memory over a dataset's pairs, at the files'
resolution (each pair registered as ``crd-jax register`` does) or on the model's grid (the training evaluation)."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from typing import TYPE_CHECKING, List, Tuple, Union

from crd_jax.cli import options
from crd_jax.cli.common import load_config
from crd_jax.errors import InputError

if TYPE_CHECKING:
    import argparse
    import os

EXAMPLE = "crd-jax evaluate --model lpba40-vm-ll-crd --data-root /data/lpba40 --subjects S35-S37 --out-dir eval/"


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = options.subcommand(
        sub,
        "evaluate",
        "Dice, HD95, folds, SDlogJ, time and memory over a dataset's pairs",
        "Evaluates a model on every ordered pair of labelled subjects: a folder of your own (--data-root "
        "DIR with DIR/images/<id>.nii.gz and DIR/labels/<id>.nii.gz; --subjects picks them) or a dataset config's "
        "evaluation split. By default each pair is registered as crd-jax register does (same options) and Dice is "
        "measured at the files' resolution, on each fixed image's own grid; --resolution model measures it on the "
        "model's grid instead (needs --config). Writes metrics.csv (per pair), summary.md and summary.json into --out-dir; "
        "the table says which resolution.",
        EXAMPLE,
    )
    options.add_model(e)
    e.add_argument(
        "--config",
        help="a dataset config file (configs/*.py): its layout, split and label set (optional "
        "with --data-root, which then reads DIR/images and DIR/labels)",
    )
    e.add_argument("--data-root", help="the data folder (overrides config.data.root)")
    e.add_argument(
        "--subjects",
        help="subjects to pair: ids, ranges or both, e.g. S01-S10 or S01,S03,S07-S09 "
        "(default: the config's evaluation split, or every labelled subject of --data-root)",
    )
    e.add_argument(
        "--resolution",
        choices=("files", "model"),
        default=None,
        help="where Dice is measured: files (default; the fixed image's own grid) or model (the model's "
        "grid, the training evaluation; needs --config; the default for synthetic configs)",
    )
    e.add_argument(
        "--split",
        help="a split name of the config: train, val or test (default: config.eval.split); for other subjects use --subjects",
    )
    e.add_argument(
        "--pairs",
        help="CSV of subject ids with a header row naming the columns, 'fixed,moving' (or "
        "'moving,fixed'); default: every ordered pair, or the config's evaluation pairs",
    )
    e.add_argument("--max-pairs", type=int, default=0, help="evaluate only the first N pairs (default 0: every pair)")
    e.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest metric)")
    e.add_argument("--timing-repeats", type=int, default=5, help="inference runs timed for the latency (median; default 5)")
    options.add_out_dir(e, "folder for metrics.csv, summary.md and summary.json (default: evaluation)", default="evaluation")
    options.add_registration_options(e)
    e.set_defaults(func=run)


def read_pair_ids(path: str, ids: List[str]) -> List[Tuple[int, int]]:
    """``--pairs``: ``(moving, fixed)`` indices into ``ids`` from a pairs file of subject ids
    (:func:`crd_jax.data.pairs.read_pairs_file`, columns ``fixed,moving``)."""
    from crd_jax.data.pairs import read_pairs_file

    rows = read_pairs_file(path, columns=("fixed", "moving"))
    if not _names_its_columns(path):
        # crd-jax 0.1.0 read a headerless evaluate pairs file as moving,fixed, this version as fixed,moving
        # (register's order): a file written for the old order would be evaluated reversed without a word
        raise InputError(
            path,
            "needs a header row naming its columns: 'fixed,moving' (or 'moving,fixed'; crd-jax "
            "0.1.0 read rows without a header as moving,fixed, this version as fixed,moving)",
        )
    pairs = []
    for row in rows:
        for sid in (row.fixed, row.moving):
            if sid not in ids:
                raise InputError(path, f"row {row.row}: unknown subject '{sid}'")
        pairs.append((ids.index(row.moving), ids.index(row.fixed)))
    return pairs


def summary_rows(summary: dict) -> list:
    """The ``| metric | mean | std |`` table of an evaluation summary, the rows its metrics have."""
    lines = ["| metric | mean | std |", "|---|---|---|"]
    for key in ("dice", "dice_before", "hd95", "folds", "percent_folds", "sdlogj"):
        if f"{key}_mean" in summary:
            lines.append(f"| {key} | {summary[key + '_mean']:.4f} | {summary[key + '_std']:.4f} |")
    return lines


def _names_its_columns(path: str) -> bool:
    """Whether the pairs file's first row (after blank and ``#`` rows) is a header naming fixed/moving."""
    from pathlib import Path

    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():  # read_pairs_file checked it reads
        cell = line.split(",")[0].strip().lower()
        if cell and not cell.startswith("#"):
            return cell in ("fixed", "moving")
    return False


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from crd_jax.data import build_datasets, dataset_labels, eval_pairs
    from crd_jax.evaluation import evaluate_pairs, measure_inference, summarize
    from crd_jax.outputs import OutputSet
    from crd_jax.registration.model import load

    if args.max_pairs < 0:
        raise InputError("--max-pairs", f"must be 0 (every pair) or more, got {args.max_pairs}")
    if not 1 <= args.timing_repeats <= 10000:
        raise InputError("--timing-repeats", f"must be between 1 and 10000, got {args.timing_repeats}")
    if not args.config and not args.data_root:
        raise InputError("evaluate", "needs --data-root DIR (DIR/images, DIR/labels) or --config")
    config = load_config(args.config) if args.config else None
    synthetic = config is not None and config.data.kind == "synthetic"
    resolution = args.resolution or ("model" if synthetic else "files")
    if resolution == "model" and config is None:
        raise InputError("--resolution", "model needs --config (the model-grid evaluation reads the config's dataset)")
    if resolution == "files" and synthetic:
        raise InputError("--resolution", "files needs image files; a synthetic config has none (use --resolution model)")
    if resolution == "model" and args.subjects:
        raise InputError("--subjects", "selects files for --resolution files; with --resolution model use --split")
    if resolution == "files":
        return _evaluate_files(args, config)
    outputs = OutputSet(args.out_dir, ["metrics.csv", "summary.md", "summary.json"], args.overwrite)
    loaded = load(options.model_path(args.model))
    if args.data_root:
        config.data.root = args.data_root
    multiple = int(loaded.spec.get("preprocessing", {}).get("multiple", 32))
    datasets = build_datasets(config.data, multiple)
    split = args.split or config.eval.split
    if split not in datasets:
        raise InputError(args.config, f"no '{split}' split in this dataset")
    ds = datasets[split]
    if not ds.has_labels:
        raise InputError(args.config, f"the '{split}' split has no label maps to evaluate against")
    pairs = (
        read_pair_ids(args.pairs, ds.ids)
        if args.pairs
        else eval_pairs(len(ds), config.data.eval_pairs, group_size=getattr(ds, "group_size", None))
    )
    if args.max_pairs > 0:
        pairs = pairs[: args.max_pairs]
    labels = dataset_labels(config.data, ds)
    eff = measure_inference(loaded.model, loaded.params, ds.shape, repeats=args.timing_repeats)
    rows = []
    for m, f in pairs:
        t = time.perf_counter()
        row = evaluate_pairs(loaded.model, loaded.params, ds, [(m, f)], labels, hd95=not args.no_hd95)[0]
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{row['moving']} -> {row['fixed']}: Dice {row['dice']:.3f}, folds {row['folds']}")
    summary = summarize(rows)
    summary["resolution"] = "model"
    summary.update({k: eff[k] for k in ("latency_s", "compile_s", "memory_mb") if k in eff})
    header = ["moving", "fixed", "dice", *[f"dice_{l}" for l in labels], "hd95", "folds", "percent_folds", "sdlogj", "seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow(
            [
                r["moving"],
                r["fixed"],
                f"{r['dice']:.5f}",
                *["" if d is None else f"{d:.5f}" for d in r["dice_per_label"]],
                f"{r.get('hd95', float('nan')):.4f}",
                r["folds"],
                f"{r['percent_folds']:.5f}",
                f"{r['sdlogj']:.5f}",
                f"{r['seconds']:.3f}",
            ]
        )
    lines = [
        f"{loaded.spec.get('label', 'model')} on {len(rows)} {split} pairs ({args.config})",
        "",
    ]
    lines += summary_rows(summary)
    lines += [
        "",
        f"Dice on the model's grid (the {'x'.join(map(str, ds.shape))} canvas the network sees), not at the files' "
        "resolution (--resolution files).",
        "",
        f"Inference: {eff['latency_s']:.3f} s per pair (median of {args.timing_repeats}), compile {eff['compile_s']:.1f} s, "
        f"XLA memory {eff.get('memory_mb', float('nan')):.0f} MB, on the {'x'.join(map(str, ds.shape))} canvas.",
    ]
    table = "\n".join(lines) + "\n"
    if not all(np.isfinite(v) for v in summary.values() if isinstance(v, float)):
        raise InputError(args.model, "evaluation produced NaN/Inf metrics; nothing was written")
    _write_evaluation(outputs, buf.getvalue(), table, summary)


def _write_evaluation(outputs, metrics_csv: str, table: str, summary) -> None:
    """``evaluate``'s output set (per-pair CSV, the table, the summary), all at once."""
    with outputs as stage:
        (stage / "metrics.csv").write_text(metrics_csv)
        (stage / "summary.md").write_text(table)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print("wrote " + ", ".join(map(str, outputs.paths())))


SUBJECT_RANGE = re.compile(r"(?P<prefix>[A-Za-z_.-]*?)(?P<a>\d+)-(?P=prefix)?(?P<b>\d+)")


def parse_subjects(spec: str, ids: List[str], where: Union[str, os.PathLike]) -> List[str]:
    """``--subjects``: ids, ranges ``S01-S10`` (the same prefix, numbers inclusive, the first number's width) or
    both, comma-separated, in the given order without repeats; every id must be one of ``ids``."""
    chosen: List[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = SUBJECT_RANGE.fullmatch(part)
        if part in ids or not m:
            names = [part]
        else:
            lo, hi = int(m.group("a")), int(m.group("b"))
            if lo > hi:
                raise InputError("--subjects", f"range {part!r} runs backwards")
            names = [f"{m.group('prefix')}{i:0{len(m.group('a'))}d}" for i in range(lo, hi + 1)]
        missing = [n for n in names if n not in ids]
        if missing:
            shown = ", ".join(ids[:3]) + (f", ... {ids[-1]}" if len(ids) > 3 else "")
            raise InputError("--subjects", f"no subject {', '.join(missing[:5])} in {where} (it has {len(ids)}: {shown})")
        chosen += [n for n in names if n not in chosen]
    if len(chosen) < 2:
        raise InputError("--subjects", f"{spec!r} selects {len(chosen)} subject(s); a pair needs at least 2")
    return chosen


def _evaluate_files(args, config) -> None:
    """``evaluate`` at the files' resolution: each pair registered as ``crd-jax register`` does, Dice of the
    warped labels against the fixed labels on the fixed image's own grid."""
    import numpy as np

    from crd_jax import metrics
    from crd_jax.data.layouts import label_protocol, list_subjects, select
    from crd_jax.evaluation import summarize
    from crd_jax.outputs import OutputSet
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import labels_on_grid, load_pair, onto_grid_labels, register_volumes
    from crd_jax.registration.space import same_grid

    root = args.data_root or config.data.root
    if config is not None:
        kwargs = {"images": config.data.images_dir, "labels": config.data.labels_dir} if config.data.kind == "folder" else {}
        subjects = list_subjects(config.data.kind, root, **kwargs)
    else:
        if args.split:
            raise InputError("--split", "names a config's split; without --config pick subjects with --subjects")
        subjects = list_subjects("folder", root)
    by_id = {s.id: s for s in subjects}
    if args.subjects:
        chosen = [by_id[i] for i in parse_subjects(args.subjects, [s.id for s in subjects], root)]
    elif config is not None:
        split = args.split or config.eval.split
        if split not in config.data.splits:
            raise InputError(args.config, f"no '{split}' split in this config (its splits: {', '.join(config.data.splits)})")
        chosen = select(subjects, config.data.splits[split])
    else:
        chosen = [s for s in subjects if s.labels]
    unlabelled = [s for s in chosen if not s.labels]
    if unlabelled:
        raise InputError(unlabelled[0].image, "has no label map to evaluate against (expected in the labels folder, same name)")
    ids = [s.id for s in chosen]
    pairs = read_pair_ids(args.pairs, ids) if args.pairs else [(m, f) for f in range(len(ids)) for m in range(len(ids)) if m != f]
    if args.max_pairs > 0:
        pairs = pairs[: args.max_pairs]
    outputs = OutputSet(args.out_dir, ["metrics.csv", "summary.md", "summary.json"], args.overwrite)
    kwargs = options.registration_kwargs(args)
    loaded = load(options.model_path(args.model))
    labels = None
    if config is not None and config.data.labels != "auto":
        labels = label_protocol(config.data.labels if isinstance(config.data.labels, str) else list(config.data.labels))
    rows, grids = [], set()
    for m, f in pairs:
        fs, ms = chosen[f], chosen[m]
        fixed, moving, moving_seg, fixed_seg = load_pair(loaded, fs.image, ms.image, ms.labels, fs.labels)
        fixed_labels = labels_on_grid(fixed_seg, fixed)
        if labels is None:  # every nonzero label of the first fixed label map
            labels = [int(v) for v in np.unique(fixed_labels) if v != 0]
        before = moving_seg.data if same_grid(moving_seg, fixed) else onto_grid_labels(moving_seg, fixed)
        t = time.perf_counter()
        result, _ = register_volumes(loaded, fixed, moving, moving_seg, **kwargs)
        seconds = time.perf_counter() - t
        dice = metrics.dice(result["warped_seg"], fixed_labels, labels)
        row = {
            "moving": ms.id,
            "fixed": fs.id,
            "dice": float(np.nanmean(dice)),
            "dice_per_label": [None if np.isnan(d) else float(d) for d in dice],
            "dice_before": float(np.nanmean(metrics.dice(before, fixed_labels, labels))),
            "folds": int(result["folds"]),
            "percent_folds": 100.0 * int(result["folds"]) / fixed.data.size,
            "sdlogj": metrics.sdlogj(result["disp"]),
            "seconds": seconds,
        }
        if not args.no_hd95:
            row["hd95"] = float(np.nanmean(metrics.hd95(result["warped_seg"], fixed_labels, labels, fixed.spacing)))
        grids.add(f"{'x'.join(map(str, fixed.data.shape))} of {' x '.join(f'{v:g}' for v in fixed.spacing)} mm")
        rows.append(row)
        print(
            f"{ms.id} -> {fs.id}: Dice {row['dice']:.3f} (before {row['dice_before']:.3f}), folds {row['folds']}, {seconds:.1f} s"
        )
    summary = summarize(rows)
    summary.update(
        {
            "resolution": "files",
            "grids": sorted(grids),
            "options": {k: v for k, v in kwargs.items()},
            "seconds_median": float(np.median([r["seconds"] for r in rows])),
        }
    )
    header = [
        "moving",
        "fixed",
        "dice",
        *[f"dice_{l}" for l in labels],
        "dice_before",
        "hd95",
        "folds",
        "percent_folds",
        "sdlogj",
        "seconds",
    ]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow(
            [
                r["moving"],
                r["fixed"],
                f"{r['dice']:.5f}",
                *["" if d is None else f"{d:.5f}" for d in r["dice_per_label"]],
                f"{r['dice_before']:.5f}",
                f"{r.get('hd95', float('nan')):.4f}",
                r["folds"],
                f"{r['percent_folds']:.5f}",
                f"{r['sdlogj']:.5f}",
                f"{r['seconds']:.3f}",
            ]
        )
    used = f"affine {kwargs['affine'] or 'off'}, {kwargs['io_steps']} io steps, normalize {kwargs['normalize_mode']}"
    lines = [
        f"{loaded.spec.get('label', 'model')} on {len(rows)} pairs of {', '.join(ids) if len(ids) <= 8 else ids[0] + ' ... ' + ids[-1]} "
        f"({root}); {len(labels)} labels; {used}",
        "",
    ]
    lines += summary_rows(summary)
    lines += [
        "",
        f"Dice at the files' resolution: each warped label map against the fixed labels on the fixed image's own "
        f"grid ({'; '.join(sorted(grids))}), not the model's grid (--resolution model). "
        f"{summary['seconds_median']:.2f} s per pair (median; registration, as crd-jax register).",
    ]
    table = "\n".join(lines) + "\n"
    _write_evaluation(outputs, buf.getvalue(), table, summary)
