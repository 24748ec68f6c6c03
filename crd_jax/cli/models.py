"""``crd-jax models``: the shipped models, what each was trained on and how well it does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crd_jax.cli import options

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    mo = options.subcommand(
        sub,
        "models",
        "list the models shipped with crd-jax",
        "Lists the shipped models: what each was trained on, its grid, voxel size and "
        "orientation, the intensities it expects and its measured validation Dice.",
        "crd-jax models",
    )
    mo.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crd_jax import pretrained

    rows = pretrained.listing()
    if not rows:
        print("no shipped models in this installation; pass a model folder to --model")
        return
    default = pretrained.default_model()
    for r in rows:
        mark = " (default)" if r["name"] == default else ""
        pre = r["preprocessing"]
        print(f"{r['name']}{mark}: {r['label']}, trained on {r.get('trained_on', '?')}")
        print(
            f"    grid {'x'.join(map(str, r.get('grid', [])))} of {r.get('voxel_size_mm')} mm, orientation "
            f"{r.get('orientation', '?')}, normalisation {pre.get('normalize', '?')}, intensities {r.get('intensity', '?')}"
        )
        print(
            f"    validation Dice {r.get('val_dice_grid')} (model grid), {r.get('val_dice_1mm')} (1 mm) on {r.get('validated_on', '?')}"
        )
