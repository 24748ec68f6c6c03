"""``crd-jax register``: one pair (``--fixed``/``--moving``) or a pairs file (``--pairs``), registered with a
model and written as one output set per pair (:mod:`crd_jax.registration`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike
    from crd_jax.registration.writing import OutputOptions

from crd_jax.cli import options
from crd_jax.errors import InputError

OUTPUT_KINDS = ("warped", "warped_seg", "disp", "jacobian", "inverse", "affine")  # writing.OUTPUT_KINDS, without its import
log = logging.getLogger("crd_jax.register")

EXAMPLES = [
    "crd-jax register --model lpba40-vm-ll-crd --fixed S01.nii.gz --moving S02.nii.gz "
    "--moving-seg S02_labels.nii.gz --out-dir out/ --disp-format itk",
    "crd-jax register --pairs pairs.csv --out-dir out/ --skip-existing --keep-going --outputs disp --disp-format compact",
    "crd-jax register --pairs pairs.csv --out-dir out/ --shard 0/4",
    "crd-jax register --pairs pairs.csv --out-dir out/ --dask local:2",
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = options.subcommand(
        sub,
        "register",
        "register a moving image to a fixed image",
        "Registers MOVING to FIXED with a trained model and writes the results on FIXED's grid. Inputs may "
        "have any orientation, voxel size and size; intensities as the model was trained on (shipped LPBA40 models: "
        "skull-stripped T1 in [0, 1]; see `crd-jax models`). Writes warped.nii.gz, warped_seg.nii.gz (with --moving-seg), "
        "the displacement (disp.nii.gz, disp_itk.nii.gz or disp_FFFF_MMMM.npz/.nii.gz), and with the options "
        "jacobian.nii.gz, inverse_disp.nii.gz, affine.txt and affine_itk.txt; all at once, never over existing files "
        "without --overwrite. --pairs registers a CSV of pairs in one process. Compiled programs are cached in "
        "~/.cache/crd_jax (CRD_JAX_CACHE_DIR), so later calls start faster.",
        EXAMPLES,
    )
    options.add_model(
        r,
        "a shipped model's name (see `crd-jax models`; default: lpba40-vm-ll-crd, the distilled "
        "1/4-resolution student: the fastest shipped model; lpba40-vm-h, the full-resolution network, scores "
        "higher at more time and memory) or a model folder (a training stage's 'model', or convert-official's output)",
    )
    r.add_argument("--fixed", help="fixed image (.nii, .nii.gz or .npz)")
    r.add_argument("--moving", help="moving image; resampled onto the fixed grid first if grids differ")
    r.add_argument(
        "--pairs",
        help="CSV of pairs 'fixed,moving[,moving_seg[,name[,fixed_seg]]]' registered in one process "
        "(compiled once, a progress bar); a header row naming the columns may give them in another order; each "
        "pair's files go to OUT_DIR/NAME (default NAME: <moving>_to_<fixed>); pairs with both label maps get their "
        "Dice, and their mean and sd are written to OUT_DIR/summary.json",
    )
    r.add_argument("--moving-seg", help="moving label map, warped with nearest neighbour")
    options.add_out_dir(r, "folder for the outputs (created if missing; with --pairs, one subfolder per pair)")
    r.add_argument("--fixed-seg", help="fixed label map: registration.json records the Dice of the warped labels with it")
    r.add_argument(
        "--disp-format",
        choices=("voxel", "itk", "learn2reg", "compact"),
        default="voxel",
        help="voxel: ours (X,Y,Z,3) voxels; itk: ANTs/ITK/Slicer displacement field; learn2reg: "
        "disp_FFFF_MMMM.npz + .nii.gz (with --pairs: all in OUT_DIR, the submission layout, ids from the file "
        "names' first digits or a FFFF_MMMM name column); compact: disp_compact.npz, the field at the network's "
        "resolution and what expands it (a few MB; `apply` and `export` expand it)",
    )
    r.add_argument(
        "--outputs",
        type=_kinds,
        default=None,
        metavar="KIND,...",
        help="what to write, from " + ",".join(OUTPUT_KINDS) + " (default: warped, warped_seg with --moving-seg, "
        "disp, affine when the affine step runs; --jacobian and --inverse add theirs); registration.json always",
    )
    options.add_pair_ids(r)
    options.add_registration_options(r)
    r.add_argument(
        "--uncompressed",
        action="store_true",
        help="write .nii instead of .nii.gz (faster: compressing a float32 field saves little space)",
    )
    r.add_argument("--jacobian", action="store_true", help="also write jacobian.nii.gz, det(I + grad u) on the fixed grid")
    r.add_argument(
        "--inverse", action="store_true", help="also write the inverse displacement (inverse_disp*, fixed-point iteration)"
    )
    r.add_argument(
        "--qc",
        action="store_true",
        help="also write qc.png (with --pairs: one per pair, in its folder): the figure `crd-jax figure --from` "
        "draws of the saved outputs (with the fixed labels when given); needs warped and disp among --outputs",
    )
    b = r.add_argument_group("many pairs (--pairs)")
    b.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip the pairs whose complete output set exists (a resumed or repeated run); an incomplete one is redone",
    )
    b.add_argument(
        "--keep-going",
        action="store_true",
        help="register the other pairs when one fails (bad rows included); the failed ones are listed in "
        "OUT_DIR/failures.csv (failures_K_of_N.csv for a shard) and the exit status is 1",
    )
    b.add_argument(
        "--shard",
        metavar="K/N",
        help="register shard K of N (K from 0): the pairs of rows i with i mod N = K. Default in a Slurm job "
        "array: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (docs/cli.md has the sbatch recipe)",
    )
    b.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="register on a Dask cluster: a scheduler's address (tcp://host:8786) or local:N for N local worker "
        'processes; one model loaded and compiled per worker (pip install "crd-jax[dask]")',
    )
    r.set_defaults(func=run)


def _kinds(text: str):
    """``--outputs``: a comma-separated list of :data:`OUTPUT_KINDS`."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{','.join(unknown) or 'nothing'}: choose from {','.join(OUTPUT_KINDS)}")
    return kinds


def output_options(args: argparse.Namespace) -> OutputOptions:
    """What one registration writes, from the options (checked before any computation)."""
    from crd_jax.registration.writing import OutputOptions

    options.resolve_registration_options(args)
    return OutputOptions(
        args.disp_format,
        options.pair_ids(args),
        args.uncompressed,
        args.jacobian,
        args.inverse,
        bool(args.affine),
        args.outputs,
        args.qc,
    )


def _used(args) -> dict:
    """The options ``registration.json`` records."""
    return {
        "normalize": args.normalize,
        "quality": args.quality,
        "affine": args.affine or None,
        "io_steps": args.io_steps,
        "disp_format": args.disp_format,
        "outputs": list(args.outputs or []) or None,
        "jacobian": args.jacobian,
        "inverse": args.inverse,
        "uncompressed": args.uncompressed,
        "qc": args.qc,
        "bf16": bool(getattr(args, "bf16", False)),
    }


def read_register_pairs(path: PathLike, learn2reg: bool = False) -> list:
    """``register --pairs``: :func:`~crd_jax.data.pairs.read_pairs_file` rows with paths relative to the file's
    folder made whole and each pair's output folder name (default ``<moving>_to_<fixed>`` from the file names),
    every name a plain folder name used once, a ``fixed_seg`` only with a ``moving_seg``; as
    :class:`~crd_jax.registration.batch.Task`\\ s (``learn2reg``: with each pair's ids, used once)."""
    from crd_jax.registration.batch import Task, learn2reg_ids
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
    rows, names, ids = [], set(), set()
    for index, row in enumerate(read_pairs_file(path)):
        name = row.name or f"{stem(row.moving)}_to_{stem(row.fixed)}"
        if name in names or "/" in name or name in (".", ".."):
            raise InputError(path, f"row {row.row}: output name {name!r} is repeated or not a plain folder name")
        names.add(name)
        pair_ids = learn2reg_ids(row.fixed, row.moving, row.name) if learn2reg else None
        if learn2reg and (pair_ids is None or pair_ids in ids or any(not options.PAIR_ID.match(v) for v in pair_ids)):
            raise InputError(
                path,
                f"row {row.row}: Learn2Reg ids {pair_ids or 'missing'} "
                f"({'repeated' if pair_ids in ids else 'no digits in a file name'}); name the pair "
                "FFFF_MMMM in the name column",
            )
        ids.add(pair_ids)
        if row.fixed_seg and not row.moving_seg:
            raise InputError(
                path,
                f"row {row.row}: a fixed_seg without a moving_seg (Dice compares the warped moving "
                "labels with the fixed ones; give both, or neither)",
            )
        rows.append(
            Task(index, row.row, name, here(row.fixed), here(row.moving), here(row.moving_seg), here(row.fixed_seg), pair_ids)
        )
    return rows


def _check_model_options(args, loaded) -> None:
    """Options that exist for 3-D images only, refused for a 2-D model before anything is computed."""
    if loaded.ndim != 3 and args.disp_format == "itk":
        raise InputError(
            "--disp-format itk", f"the ITK format holds 3-D fields; this model is {loaded.ndim}-D (use voxel or learn2reg)"
        )


def run(args: argparse.Namespace) -> Optional[int]:
    if args.skip_existing and args.overwrite:
        raise InputError("--skip-existing", "contradicts --overwrite (which redoes every pair); give one of them")
    if args.pairs:
        if args.fixed or args.moving or args.moving_seg or args.fixed_seg:
            raise InputError("--pairs", "give either --pairs or --fixed/--moving/--moving-seg/--fixed-seg, not both")
        if args.pair_ids:
            raise InputError("--pair-ids", "is for one pair; with --pairs each pair's ids come from its row")
        return register_many(args)
    for flag in ("skip_existing", "keep_going", "shard", "dask"):
        if getattr(args, flag):
            raise InputError(f"--{flag.replace('_', '-')}", "is for --pairs")
    if not (args.fixed and args.moving):
        raise InputError("register", "needs --fixed and --moving (or --pairs pairs.csv)")
    started = time.perf_counter()
    from crd_jax.outputs import OutputSet
    from crd_jax.allocator import release_free_memory
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, register_volumes
    from crd_jax.registration.writing import geometry_only, registration_record, write_registration

    written = output_options(args)
    outputs = OutputSet(
        args.out_dir, written.names(bool(args.moving_seg)), args.overwrite, family=written.family()
    )  # before computing
    kwargs = options.registration_kwargs(args)
    loaded = load(options.model_path(args.model))
    _check_model_options(args, loaded)
    t = time.perf_counter()
    fixed, moving, moving_seg, fixed_seg = load_pair(loaded, args.fixed, args.moving, args.moving_seg, args.fixed_seg)
    timings = {"load": time.perf_counter() - t}
    t = time.perf_counter()
    result, notes = register_volumes(
        loaded, fixed, moving, moving_seg, jacobian=args.jacobian, network_field=written.disp_format == "compact", **kwargs
    )
    elapsed = time.perf_counter() - t
    dice = None
    if fixed_seg is not None and "warped_seg" in result:
        from crd_jax.registration.pipeline import labels_on_grid
        from crd_jax.registration.writing import dice_scores

        dice = dice_scores(result["warped_seg"], labels_on_grid(fixed_seg, fixed))
    fixed, moving, moving_seg, fixed_seg = geometry_only(fixed), geometry_only(moving), None, None
    release_free_memory()  # the inputs' and the warps' freed blocks, before the writer's buffers
    folds, voxels = result["folds"], int(fixed.data.size)
    for note in notes:
        print(f"note: {note}")
    record = registration_record(
        loaded, args.fixed, args.moving, args.moving_seg, result, notes, elapsed, _used(args), args.fixed_seg, timings, dice
    )
    t = time.perf_counter()
    with outputs as stage:
        write_registration(stage, written, result, fixed, moving, record)
    log.info("write: %.2f s", time.perf_counter() - t)
    if result.get("warning"):  # once the outputs are in place: a failed write stays one line
        print(f"crd-jax: warning: {result['warning']}", file=sys.stderr)
    print(f"note: convolution: {options.conv_path(args)}")
    print(
        f"registered {args.moving} to {args.fixed} with {loaded.spec.get('label', 'model')} in {elapsed:.2f} s "
        f"({time.perf_counter() - started:.2f} s in all: loading, registering and writing every output); "
        f"folds (det J <= 0): {folds} voxels ({100.0 * folds / voxels:.3f}%)"
        + (f"; Dice with --fixed-seg {dice['mean']:.4f}" if dice and dice["mean"] is not None else "")
    )
    for path in outputs.paths():
        print(f"wrote {path}")


def _debug_kill_after() -> int:
    """``CRD_JAX_DEBUG_KILL_AFTER_PAIRS=N`` (tests only): SIGKILL this process once N pairs are written, as a
    scheduler's hard kill would, to show that a rerun with --skip-existing completes the batch."""
    value = os.environ.get("CRD_JAX_DEBUG_KILL_AFTER_PAIRS", "")
    return int(value) if value.isdigit() else 0


def register_many(args: argparse.Namespace) -> int:
    """``--pairs``: this run's shard of the pairs (``--shard``, or the Slurm job array's task), every input's
    header checked before the first pair (one line per bad row, status 2, nothing written; with
    ``--keep-going`` the bad rows are listed as failures instead), complete output sets skipped with
    ``--skip-existing``, the rest registered with one model per process (here, or on each ``--dask`` worker),
    each pair's line printed as it finishes; with label maps on both sides, the Dice over the pairs printed
    and written to ``summary.json``. Returns 1 when a pair failed under ``--keep-going``, else 0."""
    from tqdm import tqdm

    from crd_jax.registration import batch

    k, n = batch.parse_shard(args.shard)
    written = output_options(args)
    tasks = batch.select_shard(read_register_pairs(args.pairs, learn2reg=args.disp_format == "learn2reg"), k, n)
    model_dir = str(options.model_path(args.model))
    settings = batch.Settings(
        model_dir,
        str(Path(args.out_dir).absolute()),
        written,
        options.registration_kwargs(args),
        _used(args),
        args.overwrite,
        args.skip_existing,
        args.disp_format == "learn2reg",
        bool(getattr(args, "bf16", False)),
    )
    from crd_jax.registration.model import load

    t = time.perf_counter()
    loaded = None if args.dask else load(model_dir)
    ndim = loaded.ndim if loaded is not None else int(_model_ndim(model_dir))
    if loaded is not None:
        log.info("model: %s (%.2f s)", loaded.spec.get("label", model_dir), time.perf_counter() - t)
        _check_model_options(args, loaded)
    bad = batch.validate(tasks, ndim)
    if bad and not args.keep_going:  # one line per bad row, the last one with what happened
        for task, problem in bad[:-1]:
            print(f"crd-jax: error: {problem} (row {task.row} of {args.pairs})", file=sys.stderr)
        task, problem = bad[-1]
        raise InputError(
            problem.source,
            f"{problem.problem} (row {task.row} of {args.pairs}; {len(bad)} bad "
            f"row{'s' if len(bad) > 1 else ''}, nothing registered; --keep-going registers the others)",
        )
    failed = [batch.Outcome(task, "failed", reason=str(problem)) for task, problem in bad]
    bad_rows = {task.index for task, _ in bad}
    todo, skipped = batch.plan([task for task in tasks if task.index not in bad_rows], settings)
    shard = f" (shard {k}/{n})" if n > 1 else ""
    log.info(
        "%d pair%s%s: %d to register, %d complete (skipped), %d with bad input",
        len(tasks),
        "" if len(tasks) == 1 else "s",
        shard,
        len(todo),
        len(skipped),
        len(bad),
    )
    Path(settings.out_root).mkdir(parents=True, exist_ok=True)
    if not args.verbose:  # each pair is one line; its steps with -v
        logging.getLogger("crd_jax.registration.steps").setLevel(logging.WARNING)
    bar = tqdm(
        total=len(todo), desc="registering", unit="pair", file=sys.stderr, dynamic_ncols=True, disable=None
    )  # on a terminal only: in a log, an error stays the one line on stderr
    counts = {"done": 0}
    kill_after = _debug_kill_after()
    finished = []

    def report(outcome):
        counts["done"] += 1
        finished.append(outcome)
        line = f"[{counts['done']}/{len(todo)}] {outcome.line()}"
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        log.info("%s", line, extra={"file_only": True})
        bar.update(1)
        if kill_after and counts["done"] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    for task in skipped:
        log.debug("%s", batch.Outcome(task, "skipped").line())
    t0 = time.perf_counter()
    try:
        if args.dask:
            batch.run_dask(args.dask, todo, settings, args.keep_going, report)
        else:
            batch.run_serial(todo, settings, args.keep_going, report, loaded)
    finally:
        bar.close()
        failed += [o for o in finished if o.status == "failed"]
        if args.keep_going:  # the failures so far, also when the run is interrupted
            batch.write_failures(Path(settings.out_root) / batch.failures_name(k, n), failed)
    wall = time.perf_counter() - t0
    registered = sum(o.status == "done" for o in finished)
    where = f"on Dask ({args.dask})" if args.dask else f"with {loaded.spec.get('label', 'model')}"
    if not args.dask:
        print(f"note: convolution: {options.conv_path(args)}")
    print(
        f"registered {registered} pair{'' if registered == 1 else 's'}{shard} {where} in {wall:.1f} s "
        f"({registered / max(wall, 1e-9):.2f} pairs/s; the first includes compilation) into {settings.out_root}"
        + (f"; skipped {len(skipped)} complete" if skipped else "")
        + (f"; {len(failed)} failed" if failed else "")
    )
    if any(task.fixed_seg and task.moving_seg for task in tasks):  # Dice of this run's pairs and of the skipped ones
        summary = batch.dice_summary(finished, skipped, settings, len(tasks), len(failed), args.pairs, (k, n))
        path = Path(settings.out_root) / batch.summary_name(k, n)
        batch.write_summary(path, summary)
        dice = summary["dice"]
        print(
            f"Dice over {dice['pairs']} pair{'' if dice['pairs'] == 1 else 's'} with labels{shard}: "
            + (f"mean {dice['mean']:.4f} (sd {dice['sd']:.4f})" if dice["pairs"] else "none registered")
            + f"; written to {path}"
        )
    if failed:
        path = Path(settings.out_root) / batch.failures_name(k, n)
        print(f"crd-jax: {len(failed)} pair{'s' if len(failed) > 1 else ''} failed, listed in {path}", file=sys.stderr)
        return batch.FAILED_STATUS
    return 0


def _model_ndim(model_dir: str) -> int:
    """The model's image rank from its model.json (the Dask driver does not load the weights)."""
    import json

    try:
        spec = json.loads((Path(model_dir) / "model.json").read_text())
        return int(spec.get("preprocessing", {}).get("ndim", 3))
    except (OSError, ValueError) as exc:
        raise InputError(Path(model_dir) / "model.json", f"unreadable model record ({exc})") from None
