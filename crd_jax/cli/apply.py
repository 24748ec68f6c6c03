"""``crd-jax apply``: saved transforms (a displacement, an ITK composite, a chain of them) applied to an image or
label map (on any grid), or to world points."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from crd_jax.cli import options
from crd_jax.errors import InputError

if TYPE_CHECKING:
    import argparse

    import numpy as np

    from crd_jax.data.io import PathLike

EXAMPLES = [
    "crd-jax apply --transform out/disp.nii.gz --reference F.nii.gz --image M_seg.nii.gz --labels --out M_seg_warped.nii.gz",
    "crd-jax apply --transform out/composite.h5 --reference F.mgz --image M.nrrd --out M_warped.nii.gz",
    "crd-jax apply --transform out/composite.h5 --points F_landmarks.csv --lps --out M_landmarks.csv",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = options.subcommand(
        sub,
        "apply",
        "warp an image, a label map or points with saved transforms",
        "Warps an image or label map (on any grid) onto the reference grid with saved transforms, or maps world "
        "points (CSV with a header x,y,z, mm) from the reference (fixed) image to the moving image. Transforms: "
        "crd-jax's displacements (disp.nii.gz, disp_itk.nii.gz, disp_compact.npz, Learn2Reg .npz), ITK/ANTs "
        "transform files (composite.h5, .tfm, .txt, .mat; SimpleITK) and crd-jax's affine.txt; several are a chain "
        "in antsApplyTransforms' order: the last one listed is applied to a reference point first. Images: NIfTI, "
        ".mgz/.mgh, NRRD/MetaImage (.nrrd, .nhdr, .mha, .mhd; SimpleITK); the output is NIfTI. docs/interop.md "
        "has the ANTs and SimpleITK recipes.",
        EXAMPLES,
    )
    a.add_argument("transforms", nargs="*", metavar="TRANSFORM", help="transforms, as --transform (after any --transform)")
    a.add_argument(
        "--transform",
        "-t",
        action="append",
        default=[],
        dest="transform_list",
        metavar="FILE",
        help="a transform (repeatable; ANTs order: the last one listed is applied to a reference point first)",
    )
    a.add_argument("--disp", help="a displacement written by crd-jax register (the same as one --transform)")
    a.add_argument(
        "--disp-format",
        choices=("auto", "voxel", "itk", "learn2reg"),
        default="auto",
        help="format of the displacement fields given (default auto: .npz learn2reg or compact, *_itk.nii[.gz] "
        "or a 5-D (X,Y,Z,1,3) NIfTI itk, else voxel)",
    )
    a.add_argument(
        "--reference",
        help="the fixed image the transforms map from: the output's grid (needed with --image, and for a Learn2Reg .npz)",
    )
    a.add_argument("--image", help="image or label map to warp (any grid; placed through its affine)")
    a.add_argument(
        "--labels", action="store_true", help="the image is a label map (nearest neighbour unless --interpolation onehot)"
    )
    a.add_argument(
        "--interpolation",
        choices=("linear", "bspline", "nearest", "onehot"),
        default=None,
        help="images: linear (default), bspline (cubic) or nearest; label maps: nearest (default) or onehot",
    )
    a.add_argument(
        "--points",
        help="CSV of world points in the reference (header x,y,z, mm, RAS; other columns kept), "
        "mapped into the moving image; the output is the same CSV with the points moved",
    )
    a.add_argument(
        "--lps",
        action="store_true",
        help="--points and the output CSV are in LPS (ITK's and ANTs' convention, antsApplyTransformsToPoints' CSV), not RAS",
    )
    a.add_argument("--out", required=True, help="the NIfTI (.nii or .nii.gz; a CSV for --points) to write")
    options.add_overwrite(a, "replace --out if it exists")
    a.set_defaults(func=run)


def transform_paths(args: argparse.Namespace) -> list:
    """The chain, in the order given: ``--disp``, then every ``--transform``, then the positional ones."""
    paths = ([args.disp] if args.disp else []) + list(args.transform_list) + list(args.transforms)
    if not paths:
        raise InputError("crd-jax apply", "give the transforms to apply (--transform FILE, repeatable, or --disp FILE)")
    return paths


def interpolation(args: argparse.Namespace) -> str:
    """``--interpolation``, or its default: nearest for a label map, linear for an image."""
    if args.interpolation is None:
        return "nearest" if args.labels else "linear"
    if args.labels and args.interpolation not in ("nearest", "onehot"):
        raise InputError(args.image, f"label maps take --interpolation nearest or onehot, not {args.interpolation}")
    if not args.labels and args.interpolation == "onehot":
        raise InputError(args.image, "--interpolation onehot is for label maps: add --labels")
    return args.interpolation


def run(args: argparse.Namespace) -> None:
    if bool(args.image) == bool(args.points):
        raise InputError("crd-jax apply", "give exactly one of --image or --points")
    paths = transform_paths(args)
    out = Path(args.out)
    _not_an_input(out, [args.image, args.points, args.reference, *paths])
    if args.points:
        return _points(args, paths, out)
    if not args.reference:
        raise InputError("--image", "needs --reference: the fixed image whose grid the output takes")
    if not str(out).endswith((".nii", ".nii.gz")):
        raise InputError(out, "the output is NIfTI: name it .nii or .nii.gz")
    _image(args, paths, out, interpolation(args))


def _not_an_input(out: Path, inputs: list) -> None:
    """--out must not be one of the command's inputs (a link or another spelling included): --overwrite is for an
    earlier result, and replacing the image being warped would lose it."""
    import os

    for source in inputs:
        if source and out.exists() and Path(source).exists() and os.path.samefile(source, out):
            raise InputError(out, f"is an input of this command ({source}); write the result to another file")


def _points(args, paths, out: Path) -> None:
    from crd_jax.data.io import load_image
    from crd_jax.interop import chain
    from crd_jax.interop.points import points_csv, read_points
    from crd_jax.outputs import OutputSet

    if args.labels or args.interpolation:
        raise InputError("--points", "--labels and --interpolation are for images; points are mapped exactly")
    outputs = OutputSet(out.parent, [out.name], args.overwrite)
    table = read_points(args.points, lps=args.lps)
    reference = load_image(args.reference, require_orientation=True) if args.reference else None
    if reference is not None and len(paths) == 1 and chain.field_kind(paths[0], args.disp_format) not in (None, "compact"):
        # one displacement with its fixed image: checked to fit it, and mapped as apply always has
        from crd_jax import transforms
        from crd_jax.interop.formats import read_displacement

        moved = transforms.apply_to_points(table.xyz, read_displacement(paths[0], reference, args.disp_format), reference.affine)
    else:
        moved = chain.map_points(paths, table.xyz, reference, args.disp_format)
    with outputs as stage:  # a staging folder: the file appears at --out when complete
        (stage / out.name).write_text(points_csv(table, moved, lps=args.lps), encoding="utf-8")
    print(f"mapped {len(moved)} points ({'LPS' if args.lps else 'RAS'}) -> {out}")


def _image(args, paths, out: Path, how: str) -> None:
    import numpy as np

    from crd_jax import transforms
    from crd_jax.data.io import load_image, load_labels, save_nifti
    from crd_jax.interop.chain import displacement_for
    from crd_jax.outputs import OutputSet
    from crd_jax.registration.writing import stored_label_dtype

    t0 = time.perf_counter()
    outputs = OutputSet(out.parent, [out.name], args.overwrite)
    reference = load_image(args.reference, require_orientation=True)
    vol = (load_labels if args.labels else load_image)(args.image, require_orientation=True)
    disp = displacement_for(paths, reference, args.disp_format)
    if args.labels:
        if how == "onehot":  # on the device, every label at once (crd_jax.onehot)
            from crd_jax.onehot import warp_labels_onehot

            warped = warp_labels_onehot(vol.data, transforms.sample_coordinates(disp, reference.affine, vol.affine))
        elif vol.data.dtype.itemsize > 4:  # 64-bit labels, exactly: as indices
            from crd_jax.registration.warping import compact_labels

            indices, values = compact_labels(vol.data)
            warped = values[transforms.apply_to_labels(indices, vol.affine, disp, reference.affine, "nearest")]
        else:
            warped = transforms.apply_to_labels(vol.data, vol.affine, disp, reference.affine, how)
        warped = stored_label_dtype(np.asarray(warped), vol)
    else:
        warped = transforms.apply_to_image(vol.data, vol.affine, disp, reference.affine, how)
    with outputs as stage:
        save_nifti(stage / out.name, warped, reference.affine, None)
    print(
        f"warped {args.image} ({how}) onto {args.reference} with {len(paths)} transform{'s' * (len(paths) > 1)} -> "
        f"{out} in {time.perf_counter() - t0:.2f} s (reading, warping and writing)"
    )


def read_points(path: PathLike, lps: bool = False) -> np.ndarray:
    """The points of a points CSV as ``(N, 3)`` float64, RAS mm (:func:`crd_jax.interop.points.read_points`)."""
    from crd_jax.interop.points import read_points as read_table

    return read_table(path, lps=lps).xyz
