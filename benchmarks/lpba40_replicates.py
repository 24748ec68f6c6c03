"""Is VM-LL-CRD better than the step-matched VM-LL control beyond training noise? The replicate run
(``configs/lpba40_vm_3d_ll_replicates.py``) against the main run (``configs/lpba40_vm_3d_ll.py``).

    python benchmarks/lpba40_replicates.py       # ~/crd-runs/reproduce_lpba40_3d-ll{,-rep}

Reads the per-pair Dice (the models' grid, 30 ordered S35-S40 pairs, 56 structures) that each stage's
evaluation wrote (``stages/<stage>/eval.json``). Per stream of training pairs (seed 0: the main run; seeds
1, 2; seed 0 with B-spline augmentation), CRD and its control start from the same VM-LL and see the same
pairs: the paired CRD - control difference with a 95% bootstrap interval over pairs and a Wilcoxon p. Across
the three plain streams: the mean of the three differences and their spread, which is the training noise the
single-run interval of the main table does not contain. Writes ``<out>/reproduce_3d_ll_replicates.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lpba40_report import bootstrap_indices, paired  # noqa: E402

RUNS = Path(os.environ.get("CRD_RUNS", Path.home() / "crd-runs"))
# stream -> (run folder suffix, CRD stage, control stage)
STREAMS = {
    "seed 0 (main run)": ("", "vm_ll_crd", "vm_ll_long"),
    "seed 1": ("-rep", "vm_ll_crd_s1", "vm_ll_long_s1"),
    "seed 2": ("-rep", "vm_ll_crd_s2", "vm_ll_long_s2"),
    "seed 0, B-spline aug.": ("-rep", "vm_ll_crd_aug", "vm_ll_long_aug"),
}
PLAIN = ("seed 0 (main run)", "seed 1", "seed 2")


def pair_dice(workdir: Path, stage: str):
    path = workdir / "stages" / stage / "eval.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return {(p["moving"], p["fixed"]): float(p["dice"]) for p in record["pairs"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main", type=Path, default=RUNS / "reproduce_lpba40_3d-ll")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    run = {"": args.main, "-rep": Path(str(args.main) + "-rep")}

    low = pair_dice(args.main, "vm_ll")
    keys = sorted(low)
    idx = bootstrap_indices(len(keys))
    vec = lambda d: np.asarray([d[k] for k in keys])  # noqa: E731
    rows, payload = [], {}
    for name, (suffix, crd_stage, control_stage) in STREAMS.items():
        crd, control = pair_dice(run[suffix], crd_stage), pair_dice(run[suffix], control_stage)
        if crd is None or control is None:
            rows.append(f"| {name} | not finished | | | | |")
            continue
        c, k = vec(crd), vec(control)
        d = paired(c, k, idx)
        gain = paired(c, vec(low), idx)
        payload[name] = {"crd": float(c.mean()), "control": float(k.mean()), "crd_minus_control": d, "crd_minus_ll": gain}
        rows.append(
            f"| {name} | {c.mean():.4f} | {k.mean():.4f} | {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
            f"| {d['p']:.2g} | {gain['mean']:+.4f} |"
        )
    plain = [payload[n]["crd_minus_control"]["mean"] for n in PLAIN if n in payload]
    lines = [
        "### VM-LL-CRD vs the step-matched VM-LL control, over streams of training pairs",
        "",
        f"LPBA40 S35-S40, {len(keys)} ordered pairs, Dice over 56 structures at the models' grid. Each row: CRD and "
        "the control each trained 3,000 steps from the same VM-LL on the same pairs (the main run's VM-H, VM-LL and "
        f"FST; VM-LL alone scores {vec(low).mean():.4f}).",
        "",
        "| Stream | VM-LL-CRD | VM-LL +3000 | CRD - control [95% CI over pairs] | Wilcoxon p | CRD - VM-LL |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if len(plain) > 1:
        lines += [
            "",
            f"Across the {len(plain)} plain streams, CRD - control = {np.mean(plain):+.4f} on average "
            f"(streams: {', '.join(f'{v:+.4f}' for v in plain)}; standard deviation {np.std(plain, ddof=1):.4f}).",
        ]
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reproduce_3d_ll_replicates.md").write_text(md)
    (args.out / "reproduce_3d_ll_replicates.json").write_text(
        json.dumps({"pairs": [list(k) for k in keys], "streams": payload, "plain_differences": plain}, indent=2)
    )
    print(md)


if __name__ == "__main__":
    main()
