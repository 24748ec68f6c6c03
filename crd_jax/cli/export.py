"""``crd-jax export``: a saved voxel displacement (ours) written in the ITK or Learn2Reg format."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crd_jax.cli import options
from crd_jax.errors import InputError

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    x = options.subcommand(
        sub,
        "export",
        "convert a voxel displacement (ours) to the ITK or Learn2Reg format",
        "Writes a saved voxel displacement in another format into --out-dir: disp_itk.nii.gz (ITK/ANTs/Slicer, "
        "mm LPS) or disp_FFFF_MMMM.npz + .nii.gz (Learn2Reg).",
        "crd-jax export --disp out/disp.nii.gz --fixed F.nii.gz --format itk --out-dir out/",
    )
    x.add_argument("--disp", required=True, help="our displacement NIfTI (X,Y,Z,3), voxels, or register's disp_compact.npz")
    x.add_argument("--fixed", required=True, help="the fixed image it belongs to (geometry)")
    x.add_argument(
        "--format",
        choices=("itk", "learn2reg", "voxel"),
        required=True,
        help="itk: ANTs/ITK/Slicer field (mm, LPS); learn2reg: the challenge files; voxel: ours",
    )
    options.add_pair_ids(x)
    options.add_out_dir(x, "folder to write into (created if missing)")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from crd_jax.data.io import load_image, read_nifti_array
    from crd_jax.interop.formats import displacement_names, write_displacement
    from crd_jax.outputs import OutputSet

    ids = options.pair_ids(args)
    outputs = OutputSet(args.out_dir, displacement_names(args.format, pair_ids=ids), args.overwrite)
    fixed = load_image(args.fixed, require_orientation=True)
    from crd_jax.registration import compact

    disp = compact.expand(args.disp)[0] if compact.is_compact(args.disp) else read_nifti_array(args.disp)
    if disp.shape != (*fixed.data.shape, 3):
        raise InputError(args.disp, f"expected a voxel displacement of shape {(*fixed.data.shape, 3)}, got {disp.shape}")
    bad = int((~np.isfinite(disp)).sum())
    if bad:
        raise InputError(args.disp, f"displacement holds {bad} NaN/Inf values")
    with outputs as stage:
        write_displacement(stage, disp, fixed, args.format, pair_ids=ids)
    for path in outputs.paths():
        print(f"wrote {path}")
