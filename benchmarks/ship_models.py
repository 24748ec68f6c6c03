"""Copies the finished models of the LPBA40 3-D run into the package as shipped, named models.

    python benchmarks/ship_models.py                       # from ~/crd-runs/reproduce_lpba40_3d-ll
    python benchmarks/ship_models.py --workdir DIR --overwrite
    python benchmarks/ship_models.py --workdir ~/crd-runs/control_3d-ll --stages vm_ll_long   # the control
    python benchmarks/ship_models.py --experiment1 --overwrite --measure-1mm   # Experiment 1's student + control
    python benchmarks/ship_models.py --experiment2 --measure-1mm               # Experiment 2's n = 2 pair

``--experiment1`` ships from Experiment 1 (``configs/lpba40_crd_exp1.py``, run folder
``~/crd-runs/reproduce_lpba40_3d-ll-exp1``) stream 0 of the paper's CRD arm as ``lpba40-vm-ll-crd`` and stream 0
of the control as ``lpba40-vm-ll-control``: stream 0 because it was fixed before any result (not the stream with
the best validation Dice), the paper's arm because the paper's text is the library's default recipe. They are not
the shipped pair: the previous round's student and control (``vm_ll_crd``, ``vm_ll_long``) score higher on the
validation pairs (docs/models.md).

``--experiment2`` ships Experiment 2's (``configs/lpba40_crd_exp2.py``, run folder ``~/crd-runs/reproduce_lpba40_exp2``;
128^3, n = 2) stream 0 of the same two arms as ``lpba40-vm-l-crd`` and ``lpba40-vm-l-control``, beside the n = 4 pair,
for the same reasons, and its VM-H and VM-L as ``lpba40-vm-h-128`` and ``lpba40-vm-l`` (whichever finished: run it
after each teacher stage, so that a lost run folder does not lose them; ``crd_experiment.py`` restores them).

Each becomes ``crd_jax/pretrained/<name>/`` (``model.json`` + ``params.msgpack``) with a ``shipped`` record:
what it was trained and validated on, its grid, voxel size and orientation, the steps it trained and its
validation Dice (from the run's ``eval.json``, and at 1 mm from ``benchmarks/results/reproduce_3d_ll.json``
when the report has been made).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

RUNS = Path(os.environ.get("CRD_RUNS", Path.home() / "crd-runs"))
NAMES = {"vm_h": "lpba40-vm-h", "vm_ll": "lpba40-vm-ll", "vm_ll_crd": "lpba40-vm-ll-crd", "vm_ll_long": "lpba40-vm-ll-control"}
#: how each was trained (configs/lpba40_vm_3d_ll.py): the model card's recipe
RECIPES = {
    "vm_h": "VM-H: VoxelMorph on the full 64x80x64 grid, 3,000 steps of NCC (9^3) + grad-L2 (eq. 3), batch 1, "
    "Adam lr 1e-3 halved at 60% and 80%, gradient norm clipped at 1",
    "vm_ll": "VM-LL: the same network on the input downsampled by n = 4 (16x32x16 on the canvas), 3,000 steps of "
    "eq. 5 (the loss on the full grid), as VM-H otherwise",
    "vm_ll_crd": "VM-LL-CRD: from VM-LL, 3,000 steps of eq. 10 (L^L + 1.0 x eq. 8 on the full grid + 0.1 x eq. 9) "
    "under the FST (S1 1,000 steps from VM-H, S2 compact fusion head 1,000 steps)",
    "vm_ll_long": "The step-matched control of lpba40-vm-ll-crd: from VM-LL, 3,000 more steps of eq. 5 alone on "
    "the same stream of training pairs (6,000 in all); compare the two on your data",
}

#: Experiment 1's stages as shipped: the paper's CRD arm and its step-matched control, stream 0 (see the docstring)
EXP1_NAMES = {"crd_paper_s0": "lpba40-vm-ll-crd", "ctl_s0": "lpba40-vm-ll-control"}
EXP1_RECIPES = {
    "crd_paper_s0": "VM-LL-CRD (Experiment 1, configs/lpba40_crd_exp1.py, stream 0): from lpba40-vm-ll (3,000 "
    "steps), 6,000 steps of eq. 10 (L^L + 1.0 x eq. 8 on the full grid + 0.1 x eq. 9 on raw features) under "
    "the FST chosen on training pairs (output at full resolution through F^H_0, as the authors' code; from "
    "S1 3,000 steps on VM-H 15,000 steps); Adam lr 1e-3 halved at 60% and 80%, batch 1",
    "ctl_s0": "The step-matched control of lpba40-vm-ll-crd (Experiment 1, stream 0): from lpba40-vm-ll, 6,000 "
    "steps of eq. 5 alone on the same pairs in the same order; compare the two on your data",
}

#: Experiment 2's (128^3, n = 2): the same arms and stream, from VM-L (configs/lpba40_crd_exp2.py's protocol)
EXP2_NAMES = {"crd_paper_s0": "lpba40-vm-l-crd", "ctl_s0": "lpba40-vm-l-control"}
#: Experiment 2's finished baselines, shipped as soon as each finishes: VM-H and VM-L at the paper's 128^3 are
#: models in their own right, and kept in the package they survive a lost run folder (crd_experiment.py copies
#: them back into a new one instead of training them again: restore_shipped_stages)
EXP2_TEACHERS = {"vm_h": "lpba40-vm-h-128", "vm_l": "lpba40-vm-l"}
EXP2_NAMES.update(EXP2_TEACHERS)
EXP2_RECIPES = {
    "vm_h": "VM-H (Experiment 2, configs/lpba40_crd_exp2.py): VoxelMorph on LPBA40 resampled to 128^3, 10,000 "
    "steps of NCC (9^3) + grad-L2 (eq. 3), batch 1, Adam lr 1e-3 halved at 60% and 80%, gradient norm clipped at 1",
    "vm_l": "VM-L (Experiment 2, configs/lpba40_crd_exp2.py): the same network on the input downsampled by n = 2 "
    "(64^3), 10,000 steps of eq. 5 (the loss on the full 128^3 grid), as lpba40-vm-h-128 otherwise; the starting "
    "point of lpba40-vm-l-crd and lpba40-vm-l-control",
    "crd_paper_s0": "VM-L-CRD (Experiment 2, configs/lpba40_crd_exp2.py, stream 0): LPBA40 resampled to 128^3, n = 2; "
    "from VM-L (10,000 steps of eq. 5), 10,000 steps of eq. 10 (L^L + 1.0 x eq. 8 on the full grid + 0.1 x eq. 9 on "
    "raw features) under the FST chosen on training pairs (S1 10,000 steps from VM-H 10,000 steps, the FST 10,000); "
    "Adam lr 1e-3 halved at 60% and 80%, batch 1",
    "ctl_s0": "The step-matched control of lpba40-vm-l-crd (Experiment 2, stream 0): from VM-L, 10,000 steps of eq. 5 "
    "alone on the same pairs in the same order; compare the two on your data",
}
#: --experimentN -> (names, recipes, run folder under ~/crd-runs)
EXPERIMENTS = {
    0: (NAMES, RECIPES, "reproduce_lpba40_3d-ll"),
    1: (EXP1_NAMES, EXP1_RECIPES, "reproduce_lpba40_3d-ll-exp1"),
    2: (EXP2_NAMES, EXP2_RECIPES, "reproduce_lpba40_exp2"),
}


def _dice_at_1mm(model_dir: Path, config: dict):
    """The 30 validation pairs registered at 1 mm through ``crd-jax register``'s path (lpba40_report.py)."""
    sys.path.insert(0, str(HERE))
    import ml_collections

    from crd_jax.data import build_datasets, dataset_labels, eval_pairs
    from lpba40_report import full_resolution_rows

    data = ml_collections.ConfigDict(config["data"])
    datasets = build_datasets(data, 64)
    val = datasets["val"]
    return full_resolution_rows(model_dir, val.subjects, eval_pairs(len(val), "all"), dataset_labels(data, val), hd95=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="the run folder (default: the experiment's under ~/crd-runs)")
    p.add_argument("--dest", type=Path, default=ROOT / "crd_jax" / "pretrained")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--stages", nargs="*", default=[], help="only these stages (default: every one finished)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--experiment1", action="store_const", const=1, dest="experiment", help="Experiment 1's stream-0 pair (n = 4)"
    )
    which.add_argument(
        "--experiment2", action="store_const", const=2, dest="experiment", help="Experiment 2's stream-0 pair (n = 2)"
    )
    p.add_argument(
        "--measure-1mm",
        action="store_true",
        help="register the 30 validation pairs at 1 mm (as crd-jax register) where the report has no figure",
    )
    args = p.parse_args()
    names, recipes, folder = EXPERIMENTS[args.experiment or 0]
    args.workdir = args.workdir or RUNS / folder

    import nibabel as nib

    from crd_jax.model_io import load_model, save_model
    from crd_jax.models.build import spec_architecture

    config = json.loads((args.workdir / "config.json").read_text())
    report_path = HERE / "results" / "reproduce_3d_ll.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"models": {}}
    first = sorted((Path(config["data"]["root"]) / "images").glob("*.nii*"))[0]
    header = nib.load(str(first))
    stored = header.shape
    grid = config["data"]["resample_shape"] or list(stored)
    zooms = [float(z) * s / g for z, s, g in zip(header.header.get_zooms(), stored, grid)]
    for stage, name in names.items():
        if args.stages and stage not in args.stages:
            continue
        folder = args.workdir / "stages" / stage
        if not (folder / "model").exists():
            print(f"{stage}: not finished, skipped")
            continue
        params, spec = load_model(folder / "model")
        ev = json.loads((folder / "eval.json").read_text())
        reported = report["models"].get(stage, {})
        full = reported.get("full", {}).get("dice")
        grid_dice = reported.get("grid", {}).get("dice")
        if not grid_dice or abs(sum(grid_dice) / len(grid_dice) - ev["dice_mean"]) > 1e-6:
            full = None  # the report measured another training of this stage: its 1 mm figure is not this model's
        if full is None and args.measure_1mm:
            full = [r["dice"] for r in _dice_at_1mm(folder / "model", config)]
        spec["architecture"] = spec_architecture(spec)  # format-1 folders list every backbone's fields
        spec.pop("format_version", None)
        # models trained before the geometry record existed: the training data's orientation and voxel size
        spec.setdefault("preprocessing", {}).setdefault(
            "geometry",
            {
                "orientation": "".join(nib.aff2axcodes(header.affine)),
                "spacing": [float(z) for z in header.header.get_zooms()[:3]],
                "stored_shape": list(stored),
            },
        )
        spec["shipped"] = {
            "trained_on": "LPBA40 S11-S34 (24 subjects; skull-stripped T1 in [0, 1], affinely aligned, 1 mm)",
            "validated_on": f"LPBA40 S35-S40, {ev['num_pairs']} ordered pairs, 56 structures",
            "grid": grid,
            "canvas": config["data"]["shape"],
            "voxel_size_mm": [round(z, 3) for z in zooms],
            "orientation": "".join(nib.aff2axcodes(header.affine)),
            "source_shape": list(stored),
            "steps": spec.get("steps"),
            "recipe": recipes[stage],
            "val_dice_grid": round(ev["dice_mean"], 4),
            "val_dice_1mm": round(sum(full) / len(full), 4) if full else None,
            "intensity": "[0, 1] (the model refuses images far from its training intensities)",
        }
        existing = args.dest / name / "model.json"
        if existing.exists() and not args.overwrite:
            if json.loads(existing.read_text()).get("shipped") == json.loads(json.dumps(spec["shipped"])):
                print(f"{stage}: already shipped as {name}")  # run after each stage: the earlier ones are there
                continue
        save_model(args.dest / name, params, spec, overwrite=args.overwrite)
        size = sum(f.stat().st_size for f in (args.dest / name).iterdir())
        print(f"{stage} -> {args.dest / name} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    from crd_jax.errors import InputError

    try:
        main()
    except InputError as exc:  # e.g. a shipped model there and no --overwrite: one line, nothing replaced
        print(f"ship_models: error: {exc}", file=sys.stderr)
        sys.exit(2)
