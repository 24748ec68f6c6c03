"""``crd-jax apply``: a saved displacement applied to an image or label map (on any grid), or to world points."""

from __future__ import annotations

import time
from pathlib import Path

from crd_jax.cli import options
from crd_jax.errors import InputError

EXAMPLE = ("crd-jax apply --disp out/disp.nii.gz --reference F.nii.gz --image M_seg.nii.gz "
           "--labels --interpolation onehot --out M_seg_warped.nii.gz")


def add_parser(sub) -> None:
    a = options.subcommand(
        sub, "apply", "warp an image, a label map or points with a saved displacement",
        "Warps an image or label map (on any grid) onto the reference grid with a saved displacement, or maps world "
        "points (CSV x,y,z in mm) from the reference to the moving image.", EXAMPLE)
    a.add_argument("--disp", required=True, help="displacement written by crd-jax register (voxel, ITK or Learn2Reg format)")
    a.add_argument("--disp-format", choices=("auto", "voxel", "itk", "learn2reg"), default="auto",
                   help="the displacement's format (default auto, from the file name: .npz learn2reg, *_itk.nii[.gz] itk, else voxel)")
    a.add_argument("--reference", required=True, help="the fixed image the displacement belongs to")
    a.add_argument("--image", help="image or label map to warp (any grid; placed through its affine)")
    a.add_argument("--labels", action="store_true", help="the image is a label map")
    a.add_argument("--interpolation", choices=("linear", "bspline", "nearest", "onehot"), default="linear",
                   help="images: linear (default), bspline (cubic) or nearest; label maps: nearest or onehot")
    a.add_argument("--points", help="CSV of world coordinates x,y,z (mm) in the reference, mapped into the moving image")
    a.add_argument("--out", required=True, help="the NIfTI (or CSV for --points) to write")
    options.add_overwrite(a, "replace --out if it exists")
    a.set_defaults(func=run)


def run(args) -> None:
    import numpy as np

    from crd_jax import transforms
    from crd_jax.data.io import load_image, load_labels, save_nifti
    from crd_jax.interop.formats import read_displacement
    from crd_jax.outputs import OutputSet
    from crd_jax.registration.writing import stored_label_dtype

    if bool(args.image) == bool(args.points):
        raise InputError("crd-jax apply", "give exactly one of --image or --points")
    t0 = time.perf_counter()
    out = Path(args.out)
    outputs = OutputSet(out.parent, [out.name], args.overwrite)
    reference = load_image(args.reference, require_orientation=True)
    disp = read_displacement(args.disp, reference, args.disp_format)
    if args.points:
        table = read_points(args.points)
        moved = transforms.apply_to_points(table, disp, reference.affine)
        with outputs as stage:
            np.savetxt(stage / out.name, moved, delimiter=",", fmt="%.4f", header="x,y,z", comments="")
        print(f"mapped {len(moved)} points -> {out}")
        return
    if args.interpolation in ("nearest", "onehot") and args.labels:
        vol = load_labels(args.image, require_orientation=True)
        if args.interpolation == "onehot":  # on the device, every label at once (crd_jax.onehot)
            from crd_jax.onehot import warp_labels_onehot

            warped = warp_labels_onehot(vol.data, transforms.sample_coordinates(disp, reference.affine, vol.affine))
        elif vol.data.dtype.itemsize > 4:  # 64-bit labels, exactly: as indices
            from crd_jax.registration.warping import compact_labels

            indices, values = compact_labels(vol.data)
            warped = values[transforms.apply_to_labels(indices, vol.affine, disp, reference.affine, "nearest")]
        else:
            warped = transforms.apply_to_labels(vol.data, vol.affine, disp, reference.affine, args.interpolation)
    else:
        if args.labels or args.interpolation == "onehot":
            raise InputError(args.image, "label maps take --interpolation nearest or onehot, with --labels")
        vol = load_image(args.image, require_orientation=True)
        warped = transforms.apply_to_image(vol.data, vol.affine, disp, reference.affine, args.interpolation)
    if args.labels:
        warped = stored_label_dtype(np.asarray(warped), vol)
    with outputs as stage:
        save_nifti(stage / out.name, warped, reference.affine, None)
    print(f"warped {args.image} ({args.interpolation}) onto {args.reference} -> {out} in {time.perf_counter() - t0:.2f} s "
          "(reading, warping and writing)")


def read_points(path):
    """A CSV of world points ``x,y,z`` (mm; ``#`` comments allowed, no header line) as ``(N, 3)``
    float64; anything else is a one-line :class:`InputError`."""
    import numpy as np

    from crd_jax.data.io import check_input_file

    check_input_file(path, "a CSV of points")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [l for l in f.read().splitlines() if l.strip() and not l.lstrip().startswith("#")]
        if lines and [c.strip().lower() for c in lines[0].split(",")] == ["x", "y", "z"]:
            lines = lines[1:]  # the header apply --points writes
    except OSError as exc:
        raise InputError(path, f"unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a text file in UTF-8 (byte {exc.start})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        cells = line.split(",")
        try:
            row = [float(c) for c in cells]
        except ValueError:
            raise InputError(path, f"line {n}: expected x,y,z numbers, got {line[:60]!r}") from None
        if len(row) != 3 or not all(np.isfinite(row)):
            raise InputError(path, f"line {n}: expected 3 finite numbers (x, y, z in mm), got {line[:60]!r}")
        rows.append(row)
    if not rows:
        raise InputError(path, "no points")
    return np.asarray(rows, np.float64)

