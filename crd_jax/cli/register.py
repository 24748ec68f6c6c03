"""``crd-jax register``: one pair (``--fixed``/``--moving``) or a pairs file (``--pairs``), registered with a
model and written as one output set per pair (:mod:`crd_jax.registration`)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from crd_jax.cli import options
from crd_jax.errors import InputError

EXAMPLES = ["crd-jax register --model lpba40-vm-ll-crd --fixed S01.nii.gz --moving S02.nii.gz "
            "--moving-seg S02_labels.nii.gz --out-dir out/ --disp-format itk",
            "crd-jax register --pairs pairs.csv --out-dir out/"]


def add_parser(sub) -> None:
    r = options.subcommand(
        sub, "register", "register a moving image to a fixed image",
        "Registers MOVING to FIXED with a trained model and writes the results on FIXED's grid. Inputs may "
        "have any orientation, voxel size and size; intensities as the model was trained on (shipped LPBA40 models: "
        "skull-stripped T1 in [0, 1]; see `crd-jax models`). Writes warped.nii.gz, warped_seg.nii.gz (with --moving-seg), "
        "the displacement (disp.nii.gz, disp_itk.nii.gz or disp_FFFF_MMMM.npz/.nii.gz), and with the options "
        "jacobian.nii.gz, inverse_disp.nii.gz, affine.txt and affine_itk.txt; all at once, never over existing files "
        "without --overwrite. --pairs registers a CSV of pairs in one process. Compiled programs are cached in "
        "~/.cache/crd_jax (CRD_JAX_CACHE_DIR), so later calls start faster.", EXAMPLES)
    options.add_model(r, "a shipped model's name (see `crd-jax models`; default: lpba40-vm-ll-crd, the distilled "
                      "1/4-resolution student: the fastest shipped model; lpba40-vm-h, the full-resolution network, scores "
                      "higher at more time and memory) or a model folder (a training stage's 'model', or convert-official's output)")
    r.add_argument("--fixed", help="fixed image (.nii, .nii.gz or .npz)")
    r.add_argument("--moving", help="moving image; resampled onto the fixed grid first if grids differ")
    r.add_argument("--pairs", help="CSV of pairs 'fixed,moving[,moving_seg[,name]]' registered in one process (compiled "
                   "once, a progress bar); a header row naming the columns may give them in another order; each pair's "
                   "files go to OUT_DIR/NAME (default NAME: <moving>_to_<fixed>)")
    r.add_argument("--moving-seg", help="moving label map, warped with nearest neighbour")
    options.add_out_dir(r, "folder for the outputs (created if missing; with --pairs, one subfolder per pair)")
    r.add_argument("--disp-format", choices=("voxel", "itk", "learn2reg"), default="voxel",
                   help="voxel: ours (X,Y,Z,3) voxels; itk: ANTs/ITK/Slicer displacement field; learn2reg: disp_FFFF_MMMM.npz + .nii.gz")
    options.add_pair_ids(r)
    options.add_registration_options(r)
    r.add_argument("--uncompressed", action="store_true",
                   help="write .nii instead of .nii.gz (faster: compressing a float32 field saves little space)")
    r.add_argument("--jacobian", action="store_true", help="also write jacobian.nii.gz, det(I + grad u) on the fixed grid")
    r.add_argument("--inverse", action="store_true", help="also write the inverse displacement (inverse_disp*, fixed-point iteration)")
    r.set_defaults(func=run)


def output_options(args):
    """What one registration writes, from the options (checked before any computation)."""
    from crd_jax.registration.writing import OutputOptions

    options.resolve_registration_options(args)
    return OutputOptions(args.disp_format, options.pair_ids(args), args.uncompressed, args.jacobian, args.inverse,
                         bool(args.affine))


def _record(args, loaded, fixed_path, moving_path, seg_path, result, notes, seconds) -> dict:
    from crd_jax.registration.writing import registration_record

    used = {"normalize": args.normalize, "quality": args.quality, "affine": args.affine or None,
            "io_steps": args.io_steps, "disp_format": args.disp_format}
    return registration_record(loaded, fixed_path, moving_path, seg_path, result, notes, seconds, used)


def read_register_pairs(path) -> list:
    """``register --pairs``: :func:`~crd_jax.data.pairs.read_pairs_file` rows with paths relative to the file's
    folder made whole and each pair's output folder name (default ``<moving>_to_<fixed>`` from the file names),
    every name a plain folder name used once."""
    from crd_jax.data.io import NIFTI_SUFFIXES
    from crd_jax.data.pairs import read_pairs_file

    folder = Path(path).parent

    def stem(p: str) -> str:
        name = Path(p).name
        for suffix in NIFTI_SUFFIXES + (".npz",):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    here = lambda p: p and str(p if Path(p).is_absolute() else folder / p)  # noqa: E731
    rows, names = [], set()
    for row in read_pairs_file(path):
        name = row.name or f"{stem(row.moving)}_to_{stem(row.fixed)}"
        if name in names or "/" in name or name in (".", ".."):
            raise InputError(path, f"row {row.row}: output name {name!r} is repeated or not a plain folder name")
        names.add(name)
        rows.append(dataclasses.replace(row, fixed=here(row.fixed), moving=here(row.moving),
                                        moving_seg=here(row.moving_seg), name=name))
    return rows


def _check_model_options(args, loaded) -> None:
    """Options that exist for 3-D images only, refused for a 2-D model before anything is computed."""
    if loaded.ndim != 3 and args.disp_format == "itk":
        raise InputError("--disp-format itk", f"the ITK format holds 3-D fields; this model is {loaded.ndim}-D "
                         "(use voxel or learn2reg)")


def run(args) -> None:
    if args.pairs:
        if args.fixed or args.moving or args.moving_seg:
            raise InputError("--pairs", "give either --pairs or --fixed/--moving/--moving-seg, not both")
        return _register_many(args)
    if not (args.fixed and args.moving):
        raise InputError("register", "needs --fixed and --moving (or --pairs pairs.csv)")
    started = time.perf_counter()
    from crd_jax.outputs import OutputSet
    from crd_jax.registration.allocator import release_free_memory
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, register_volumes
    from crd_jax.registration.writing import geometry_only, write_registration

    written = output_options(args)
    outputs = OutputSet(args.out_dir, written.names(bool(args.moving_seg)), args.overwrite,
                        family=written.family())  # before computing
    kwargs = options.registration_kwargs(args)
    loaded = load(options.model_path(args.model))
    _check_model_options(args, loaded)
    fixed, moving, moving_seg, _ = load_pair(loaded, args.fixed, args.moving, args.moving_seg)
    t = time.perf_counter()
    result, notes = register_volumes(loaded, fixed, moving, moving_seg, jacobian=args.jacobian, **kwargs)
    elapsed = time.perf_counter() - t
    fixed, moving, moving_seg = geometry_only(fixed), geometry_only(moving), None
    release_free_memory()  # the inputs' and the warps' freed blocks, before the writer's buffers
    folds, voxels = result["folds"], int(fixed.data.size)
    for note in notes:
        print(f"note: {note}")
    record = _record(args, loaded, args.fixed, args.moving, args.moving_seg, result, notes, elapsed)
    with outputs as stage:
        write_registration(stage, written, result, fixed, moving, record)
    if result.get("warning"):  # once the outputs are in place: a failed write stays one line
        print(f"crd-jax: warning: {result['warning']}", file=sys.stderr)
    print(f"note: convolution: {options.conv_path(args)}")
    print(f"registered {args.moving} to {args.fixed} with {loaded.spec.get('label', 'model')} in {elapsed:.2f} s "
          f"({time.perf_counter() - started:.2f} s in all: loading, registering and writing every output); "
          f"folds (det J <= 0): {folds} voxels ({100.0 * folds / voxels:.3f}%)")
    for path in outputs.paths():
        print(f"wrote {path}")


def _register_many(args) -> None:
    """``--pairs``: every pair in one process (the model loaded and compiled once), one subfolder each, a
    progress bar. Every input and output folder is checked before the first registration; each pair's files
    appear at once when it is done."""
    from tqdm import tqdm

    from crd_jax.data.io import check_input_file
    from crd_jax.outputs import OutputSet
    from crd_jax.registration.allocator import release_free_memory
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, register_volumes
    from crd_jax.registration.writing import geometry_only, write_registration

    pairs = read_register_pairs(args.pairs)
    for row in pairs:  # every input exists before the first registration
        for path in filter(None, (row.fixed, row.moving, row.moving_seg)):
            check_input_file(path)
    out = Path(args.out_dir)
    written = output_options(args)
    outputs = [OutputSet(out / row.name, written.names(bool(row.moving_seg)), args.overwrite, family=written.family())
               for row in pairs]
    loaded = load(options.model_path(args.model))
    _check_model_options(args, loaded)
    kwargs = options.registration_kwargs(args)
    t0 = time.perf_counter()
    log = []
    bar = tqdm(total=len(pairs), desc="registering", unit="pair", file=sys.stderr, dynamic_ncols=True,
               disable=None)  # on a terminal only: in a log, an error stays the one line on stderr
    for row, outset in zip(pairs, outputs):
        fixed, moving, moving_seg, _ = load_pair(loaded, row.fixed, row.moving, row.moving_seg)
        t = time.perf_counter()
        result, notes = register_volumes(loaded, fixed, moving, moving_seg, jacobian=args.jacobian, **kwargs)
        record = _record(args, loaded, row.fixed, row.moving, row.moving_seg, result, notes, time.perf_counter() - t)
        fixed, moving, moving_seg = geometry_only(fixed), geometry_only(moving), None
        with outset as stage:
            write_registration(stage, written, result, fixed, moving, record)
        log.append(f"{row.name}: {time.perf_counter() - t:.2f} s, folds {result['folds']}"
                   + (f"; warning: {result['warning']}" if result.get("warning") else ""))
        del result  # the next pair's inputs must not sit beside this pair's field and warped volumes
        release_free_memory()
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    for line in log:
        print(line)
    print(f"note: convolution: {options.conv_path(args)}")
    print(f"registered {len(pairs)} pair{'' if len(pairs) == 1 else 's'} with {loaded.spec.get('label', 'model')} in "
          f"{wall:.1f} s ({len(pairs) / wall:.2f} pairs/s; the first includes compilation) into {out}")
