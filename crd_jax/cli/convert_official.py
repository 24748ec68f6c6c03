"""``crd-jax convert-official``: the authors' PyTorch checkpoint as a crd-jax model folder (no torch needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crd_jax.cli import options

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = options.subcommand(
        sub,
        "convert-official",
        "the authors' PyTorch checkpoint -> a crd-jax model folder (no torch needed)",
        "Converts a legacy .pth of the authors' released CRD code into a model folder (model.json + "
        "params.msgpack). The models were trained on OASIS aligned_norm volumes as stored (LIA, 1 mm, 160x192x224, "
        "intensities in [0, 1]); model.json records that space, so registration reorients and resamples inputs "
        "into it, and a card (training data, terms: no licence stated by the authors, the source checkpoint).",
        "crd-jax convert-official --checkpoint VMdalca1_Hinput_OASIS_R1_D_24500.pth --kind student "
        "--out models/crd_oasis_student",
    )
    c.add_argument("--checkpoint", required=True, help="legacy torch .pth (e.g. VMdalca1_Hinput_OASIS_R1_D_24500.pth)")
    c.add_argument(
        "--kind", choices=("student", "teacher"), required=True, help="which of the authors' networks the checkpoint holds"
    )
    c.add_argument("--out", required=True, help="model folder to write (a new folder)")
    options.add_overwrite(c, "replace a crd-jax model folder that exists there")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crd_jax.interop import official
    from crd_jax.interop.torch_legacy import load_legacy_checkpoint
    from crd_jax.model_io import check_model_destination, save_model

    out = check_model_destination(args.out, args.overwrite)
    state = load_legacy_checkpoint(args.checkpoint)
    params, spec = official.convert(state, args.kind, source=args.checkpoint)
    spec["source"] = str(args.checkpoint)
    save_model(out, params, spec, overwrite=args.overwrite)
    print(f"converted {args.checkpoint} ({args.kind}) -> {out}")
