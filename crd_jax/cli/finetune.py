"""``crd-jax finetune``: a shipped model (or any model folder) trained further on a folder of the user's scans,
in the model's own space and preprocessing (:mod:`crd_jax.training.finetune`), written as a model folder that
``crd-jax register --model`` takes. Re-running the same command resumes from the last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from crd_jax.cli import options

if TYPE_CHECKING:
    import argparse

EXAMPLE = """example:
  crd-jax finetune --model lpba40-vm-ll-crd --images scans/images --labels scans/labels \\
      --out my-model --steps 2000
  crd-jax register --model my-model --fixed a.nii.gz --moving b.nii.gz --out-dir a_b"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    import argparse

    p = sub.add_parser(
        "finetune",
        help="train a shipped model further on your own scans",
        description="Trains a shipped model (or any model folder) further on a folder of your scans, "
        "mapped into the model's own space (orientation, voxel size, normalisation) as register maps its "
        "inputs, and writes a model folder that `crd-jax register --model` takes. Re-running the same "
        "command resumes from the last checkpoint.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="lpba40-vm-ll-crd",
        help="the model to start from: a shipped model's name (crd-jax models) or a model folder (default: lpba40-vm-ll-crd)",
    )
    options.add_allow_backbone_module(p)
    p.add_argument("--images", required=True, help="folder of NIfTI scans (at least two; roughly aligned to each other)")
    p.add_argument(
        "--labels",
        default="",
        help="folder of label maps named as the scans: the last --val-subjects "
        "subjects are held back and the Dice before and after is reported",
    )
    p.add_argument("--out", required=True, help="the model folder to write (refused if it exists, unless --overwrite)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default: 1000)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    p.add_argument("--val-subjects", type=int, default=2, help="labelled subjects held back for validation (default: 2)")
    p.add_argument(
        "--workdir", default="", help="checkpoints and logs; re-running resumes there (default: <out>.work beside --out)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a crd-jax model folder at --out (nothing else is replaced)")
    p.set_defaults(func=run)


OPTIONS = {
    "config.init_from": "--model",
    "config.finetune.val_subjects": "--val-subjects",
    "config.finetune.steps": "--steps",
    "config.train.lr": "--lr",
    "config.data.images_dir": "--images",
    "config.data.labels_dir": "--labels",
}


def run(args: argparse.Namespace) -> None:
    from crd_jax.errors import InputError
    from crd_jax.training import finetune, pipeline

    from crd_jax.model_io import check_model_destination, copy_model

    # before any training: only a crd-jax model folder is ever replaced (a folder of anything else stays as it is)
    out = check_model_destination(args.out, args.overwrite)
    images = Path(args.images).absolute()
    if not images.is_dir():
        raise InputError(images, "is not a folder of scans")
    if args.steps < 1:
        raise InputError("--steps", f"must be at least 1, got {args.steps}")
    if not args.lr > 0 or args.lr != args.lr or args.lr == float("inf"):
        raise InputError("--lr", f"must be a finite positive number, got {args.lr}")
    if args.labels and not Path(args.labels).is_dir():
        raise InputError(Path(args.labels).absolute(), "is not a folder of label maps")
    if args.val_subjects < 0:
        raise InputError("--val-subjects", f"must be 0 or more, got {args.val_subjects}")
    config = finetune.default_config()
    config.init_from = args.model
    config.data.root = str(images.parent)
    config.data.images_dir = str(images)
    config.data.labels_dir = str(Path(args.labels).absolute()) if args.labels else ".crd-jax-no-labels"
    config.finetune.steps = int(args.steps)
    config.finetune.val_subjects = int(args.val_subjects)
    config.train.lr = float(args.lr)
    config.workdir = str(Path(args.workdir).absolute() if args.workdir else out.parent / f"{out.name}.work")
    try:
        pipeline.run(config)
    except InputError as exc:  # this command's option, not the training config's field it set
        raise InputError(OPTIONS.get(exc.source, exc.source), exc.problem) from None
    trained = Path(config.workdir) / "stages" / "finetune" / "model"
    try:
        copy_model(trained, out, overwrite=args.overwrite)
    except InputError as exc:  # something appeared at --out while it trained: the model is not lost
        raise InputError(exc.source, f"{exc.problem}; the trained model is in {trained}") from None
    print(f"fine-tuned model -> {out} (register with: crd-jax register --model {out} ...)")
