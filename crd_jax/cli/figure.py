"""``crd-jax figure``: a PNG or PDF like the paper's Fig. 4 for one pair, drawn from a saved registration
(``--from OUT_DIR``) or after registering the pair (:mod:`crd_jax.drawing` draws it)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from crd_jax.cli import options
from crd_jax.errors import InputError

if TYPE_CHECKING:
    import argparse

EXAMPLES = [
    "crd-jax figure --from out/ --out out/overview.png",
    "crd-jax figure --model lpba40-vm-ll-crd --fixed F.nii.gz --moving M.nii.gz --fixed-seg FS.nii.gz "
    "--moving-seg MS.nii.gz --out pair.pdf",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    f = options.subcommand(
        sub,
        "figure",
        "a PNG or PDF like the paper's Fig. 4 for one pair",
        textwrap.fill(
            "Draws fixed, moving, warped (with the label overlap when both label maps are given, the warped "
            "labels alone when only the moving ones are), the deformed grid and the error map on the axial, coronal and "
            "sagittal mid-slices in radiological orientation (patient right on the viewer's left). --from OUT_DIR draws "
            "the registration crd-jax register saved there (no model, nothing registered again); otherwise the pair is "
            "registered first. Writes the one file --out (.png or .pdf).",
            100,
        ),
        EXAMPLES,
        raw=True,
    )
    f.add_argument(
        "--from",
        dest="from_dir",
        metavar="OUT_DIR",
        help="a crd-jax register output folder: draw its saved result (its registration.json names the "
        "fixed and moving images; --fixed/--moving override it)",
    )
    options.add_model(f, options.MODEL_HELP + "; not with --from")
    f.add_argument("--fixed", help="fixed image (.nii, .nii.gz or .npz)")
    f.add_argument("--moving", help="moving image (any grid; resampled onto the fixed grid)")
    f.add_argument("--fixed-seg", help="fixed label map: the warped labels are drawn against it (agree / disagree)")
    f.add_argument("--moving-seg", help="moving label map: warped and drawn over the warped image")
    f.add_argument("--out", required=True, help="PNG (or PDF) to write")
    options.add_overwrite(f, "replace the file if it exists")
    options.add_registration_options(f)
    f.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crd_jax.drawing import draw_pair
    from crd_jax.outputs import OutputSet

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf"):
        raise InputError(out, "the figure must be a .png or .pdf file")
    if args.from_dir and args.model:
        raise InputError("--from", "draws a saved registration with no model; leave out --model")
    if not args.from_dir and not (args.fixed and args.moving):
        raise InputError("figure", "needs --from OUT_DIR (a saved registration) or --fixed and --moving")
    outputs = OutputSet(out.parent, [out.name], args.overwrite)
    warning = None
    if args.from_dir:
        fixed, moving_shown, warped, disp, fixed_seg, warped_seg, title = _saved_registration(args)
    else:
        from crd_jax.registration.model import load
        from crd_jax.registration.pipeline import labels_on_grid, load_pair, register_volumes

        loaded = load(options.model_path(args.model))
        fixed, moving, moving_seg, fixed_seg_vol = load_pair(loaded, args.fixed, args.moving, args.moving_seg, args.fixed_seg)
        fixed_seg = labels_on_grid(fixed_seg_vol, fixed)
        result, notes = register_volumes(loaded, fixed, moving, moving_seg, **options.registration_kwargs(args))
        for note in notes:
            print(f"note: {note}")
        if result.get("warning"):
            warning = result["warning"]
        from crd_jax.registration.space import onto_grid, same_grid

        moving_shown = moving.data if same_grid(fixed, moving) else onto_grid(moving, fixed, order=1)
        warped, disp, warped_seg = result["warped"], result["disp"], result.get("warped_seg")
        title = f"{Path(args.moving).name} -> {Path(args.fixed).name} ({loaded.spec.get('label', '')})"
    with outputs as stage:
        draw_pair(stage / out.name, fixed, moving_shown, warped, disp, fixed_seg, warped_seg, title)
    if warning:
        print(f"crd-jax: warning: {warning}", file=sys.stderr)
    print(f"wrote {out}")


def _saved_registration(args):
    """What ``figure --from OUT_DIR`` draws (:func:`crd_jax.drawing.saved_registration`: no model is loaded
    and nothing is registered; ``register --qc`` draws the same)."""
    from crd_jax.drawing import saved_registration

    drawn = saved_registration(args.from_dir, args.fixed, args.moving, args.fixed_seg)
    print(f"figure: drawn from the saved registration in {args.from_dir} (no model loaded, nothing registered)")
    return drawn
