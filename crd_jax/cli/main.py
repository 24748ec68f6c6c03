"""``crd-jax``: register images with a trained model, evaluate it, draw figures, convert the authors' weights.

    crd-jax register --model runs/oasis/stages/vm_l_crd/model --fixed F.nii.gz --moving M.nii.gz --out-dir out
    crd-jax evaluate --model runs/oasis/stages/vm_l_crd/model --config configs/oasis_vm.py
    crd-jax figure --model MODEL --fixed F.nii.gz --moving M.nii.gz --out pair.png
    crd-jax convert-official --checkpoint student.pth --kind student --out models/crd_official_student
    crd-jax export --disp out/disp.nii.gz --fixed F.nii.gz --format itk --out-dir out

Bad input (an unreadable file, a wrong rank, NaN voxels, a checkpoint of the wrong kind, an output folder
that is a file) prints one line and exits with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional

from crd_jax.errors import InputError


def _load_config(path: str):
    """``get_config()`` of a config file (as ``train.py --config=...`` would)."""
    path_obj = Path(path)
    if not path_obj.exists():
        raise InputError(path, "no such config file")
    from crd_jax.data.io import check_input_file

    check_input_file(path_obj, "a config file (.py)")
    root = str(path_obj.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # configs may import each other as ``configs.x``
    spec = importlib.util.spec_from_file_location(f"_crd_config_{path_obj.stem}", path_obj)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as exc:
        raise InputError(path, f"config does not load ({type(exc).__name__}: {exc})") from None


def _model_path(model):
    from crd_jax import pretrained

    return pretrained.resolve(model)


def cmd_models(args) -> None:
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
        print(f"    grid {'x'.join(map(str, r.get('grid', [])))} of {r.get('voxel_size_mm')} mm, orientation "
              f"{r.get('orientation', '?')}, normalisation {pre.get('normalize', '?')}, intensities {r.get('intensity', '?')}")
        print(f"    validation Dice {r.get('val_dice_grid')} (model grid), {r.get('val_dice_1mm')} (1 mm) on {r.get('validated_on', '?')}")


def label_dtype(labels):
    """Label maps stored in the smallest integer type that holds them (int16 for the usual atlases)."""
    import numpy as np

    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if labels.size == 0 or (labels.min() >= info.min and labels.max() <= info.max):
            return labels.astype(dtype, copy=False)
    return labels.astype(np.int64)


PAIR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _pair_ids(args):
    """``--pair-ids`` checked: each id becomes part of a file name, so it must be a plain name (letters, digits,
    '.', '_', '-'; no '/', no '..'), never a path that leads out of the output folder."""
    if not args.pair_ids:
        return None
    for value in args.pair_ids:
        if not PAIR_ID.match(value) or ".." in value:
            raise InputError("--pair-ids", f"{value!r} is not a plain id (letters, digits, '.', '_', '-'; at most 64, "
                                           "no '/' or '..'); nothing was written")
    return tuple(args.pair_ids)


def _register_family(args) -> List[str]:
    """Every file ``register`` can write into one folder, whatever its options (Learn2Reg files: this pair's
    ids only; other pairs' files in a submission folder are not this run's set)."""
    from crd_jax.interop.formats import displacement_names

    ids = _pair_ids(args)
    names = ["affine.txt", "affine_itk.txt", "registration.json"]
    for ext in (".nii.gz", ".nii"):
        names += [f"warped{ext}", f"warped_seg{ext}", f"disp{ext}", f"disp_itk{ext}", f"jacobian{ext}",
                  f"inverse_disp{ext}", f"inverse_disp_itk{ext}"]
        names += displacement_names("learn2reg", pair_ids=ids, ext=ext)
    return names


def _register_names(args, with_seg: bool) -> List[str]:
    """Every file one registration writes, from the options (checked before any computation)."""
    from crd_jax.interop.formats import displacement_names

    ids = _pair_ids(args)
    resolve_registration_options(args)
    ext = ".nii" if args.uncompressed else ".nii.gz"
    names = [f"warped{ext}"] + ([f"warped_seg{ext}"] if with_seg else [])
    names += displacement_names(args.disp_format, pair_ids=ids, ext=ext)
    names += ["affine.txt", "affine_itk.txt"] if args.affine else []
    names += ([f"jacobian{ext}"] if args.jacobian else []) + ([_inverse_name(args)] if args.inverse else [])
    return names + ["registration.json"]


def _inverse_name(args) -> str:
    ext = ".nii" if args.uncompressed else ".nii.gz"
    return f"inverse_disp_itk{ext}" if args.disp_format == "itk" else f"inverse_disp{ext}"


def _geometry_only(volume):
    """The volume with its voxels dropped (a zero-strided view of the same shape and type): what writing the
    results needs of an input, so that the inputs' memory is free before the outputs are written."""
    import dataclasses

    import numpy as np

    return dataclasses.replace(volume, data=np.broadcast_to(np.zeros((), volume.data.dtype), volume.data.shape))


def _registration_record(args, loaded, fixed_path, moving_path, seg_path, result, notes, seconds) -> dict:
    """``registration.json``: what was registered, how, and what came of it (``crd-jax figure --from`` reads
    the inputs' paths from it)."""
    import crd_jax

    where = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    return {"fixed": where(fixed_path), "moving": where(moving_path), "moving_seg": where(seg_path),
            "model": loaded.path, "model_label": loaded.spec.get("label", ""),
            "options": {"normalize": args.normalize, "quality": args.quality, "affine": args.affine or None,
                        "io_steps": args.io_steps, "disp_format": args.disp_format},
            "folds": int(result["folds"]), "seconds": round(float(seconds), 3), "notes": list(notes),
            "warning": result.get("warning"), "crd_jax": crd_jax.__version__}


def _write_registration(stage: Path, args, result, fixed, moving, record: Optional[dict] = None) -> None:
    from crd_jax.data.io import save_nifti
    from crd_jax.interop.formats import write_displacement

    if record is not None:
        (stage / "registration.json").write_text(json.dumps(record, indent=2) + "\n")
    ids = _pair_ids(args)
    ext = ".nii" if args.uncompressed else ".nii.gz"
    save_nifti(stage / f"warped{ext}", result["warped"].astype(fixed.data.dtype, copy=False), fixed.affine, fixed.header)
    if "warped_seg" in result:
        save_nifti(stage / f"warped_seg{ext}", label_dtype(result["warped_seg"]), fixed.affine, None)
    write_displacement(stage, result["disp"], fixed, args.disp_format, pair_ids=ids, ext=ext)
    if args.jacobian:
        save_nifti(stage / f"jacobian{ext}", result["jacobian"], fixed.affine, None)
    if args.affine:
        from crd_jax.affine_align import itk_affine_text

        world = result["affine"].world_transform(fixed.data.shape, fixed.affine, moving.affine)
        (stage / "affine.txt").write_text("# fixed world (RAS, mm) -> moving world, 4x4\n" + "\n".join(
            " ".join(f"{v:.10g}" for v in row) for row in world) + "\n")
        (stage / "affine_itk.txt").write_text(itk_affine_text(world))
    if args.inverse:
        from crd_jax.transforms import invert_fast

        inverse = invert_fast(result["disp"])
        if args.disp_format == "itk":
            from crd_jax.interop.formats import to_itk

            inverse = to_itk(inverse, fixed.affine)
        save_nifti(stage / _inverse_name(args), inverse, fixed.affine, None, intent="vector")


def read_pairs_csv(path: str) -> List[tuple]:
    """``fixed,moving[,moving_seg[,name]]`` rows (a header row naming ``fixed`` is skipped; relative paths are
    relative to the CSV's folder). ``name`` is the pair's output subfolder, by default
    ``<moving>_to_<fixed>`` from the file names."""
    from crd_jax.data.io import NIFTI_SUFFIXES

    from crd_jax.data.io import check_input_file

    csv_path = check_input_file(path, "a CSV file")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # a BOM (spreadsheet exports) is not part of a path
    except OSError as exc:
        raise InputError(csv_path, f"unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(csv_path, f"not a text file in UTF-8 (byte {exc.start})") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if rows and rows[0][0].strip().lower() == "fixed":
        rows = rows[1:]
    if not rows:
        raise InputError(csv_path, "no pairs (expected rows 'fixed,moving[,moving_seg[,name]]')")

    def stem(p: str) -> str:
        name = Path(p).name
        for suffix in NIFTI_SUFFIXES + (".npz",):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    pairs, names = [], set()
    for i, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if len(cells) < 2 or len(cells) > 4 or not cells[0] or not cells[1]:
            raise InputError(csv_path, f"row {i}: expected 'fixed,moving[,moving_seg[,name]]', got {','.join(row)!r}")
        here = lambda p: str(p if Path(p).is_absolute() else csv_path.parent / p)  # noqa: E731
        seg = here(cells[2]) if len(cells) > 2 and cells[2] else None
        name = cells[3] if len(cells) > 3 and cells[3] else f"{stem(cells[1])}_to_{stem(cells[0])}"
        if name in names or "/" in name or name in (".", ".."):
            raise InputError(csv_path, f"row {i}: output name {name!r} is repeated or not a plain folder name")
        names.add(name)
        pairs.append((here(cells[0]), here(cells[1]), seg, name))
    return pairs


def _check_model_options(args, loaded) -> None:
    """Options that exist for 3-D images only, refused for a 2-D model before anything is computed."""
    if loaded.ndim != 3 and args.disp_format == "itk":
        raise InputError("--disp-format itk", f"the ITK format holds 3-D fields; this model is {loaded.ndim}-D "
                         "(use voxel or learn2reg)")


def cmd_register(args) -> None:
    if args.pairs:
        if args.fixed or args.moving or args.moving_seg:
            raise InputError("--pairs", "give either --pairs or --fixed/--moving/--moving-seg, not both")
        return _register_many(args)
    if not (args.fixed and args.moving):
        raise InputError("register", "needs --fixed and --moving (or --pairs pairs.csv)")
    started = time.perf_counter()
    from crd_jax.registration.allocator import release_free_memory
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, register_volumes
    from crd_jax.outputs import OutputSet

    outputs = OutputSet(args.out_dir, _register_names(args, bool(args.moving_seg)), args.overwrite,
                        family=_register_family(args))  # before computing
    kwargs = registration_kwargs(args)
    loaded = load(_model_path(args.model))
    _check_model_options(args, loaded)
    fixed, moving, moving_seg, _ = load_pair(loaded, args.fixed, args.moving, args.moving_seg)
    t = time.perf_counter()
    result, notes = register_volumes(loaded, fixed, moving, moving_seg, jacobian=args.jacobian, **kwargs)
    elapsed = time.perf_counter() - t
    fixed, moving, moving_seg = _geometry_only(fixed), _geometry_only(moving), None
    release_free_memory()  # the inputs' and the warps' freed blocks, before the writer's buffers
    folds, voxels = result["folds"], int(fixed.data.size)
    for note in notes:
        print(f"note: {note}")
    record = _registration_record(args, loaded, args.fixed, args.moving, args.moving_seg, result, notes, elapsed)
    with outputs as stage:
        _write_registration(stage, args, result, fixed, moving, record)
    if result.get("warning"):  # once the outputs are in place: a failed write stays one line
        print(f"crd-jax: warning: {result['warning']}", file=sys.stderr)
    print(f"note: convolution: {_conv_path(args)}")
    print(f"registered {args.moving} to {args.fixed} with {loaded.spec.get('label', 'model')} in {elapsed:.2f} s "
          f"({time.perf_counter() - started:.2f} s in all: loading, registering and writing every output); "
          f"folds (det J <= 0): {folds} voxels ({100.0 * folds / voxels:.3f}%)")
    for path in outputs.paths():
        print(f"wrote {path}")


def _register_many(args) -> None:
    """``--pairs``: every pair in one process (the model loaded and compiled once), one subfolder each, a
    progress bar. Every output folder is checked before the first registration; each pair's files appear at
    once when it is done."""
    from tqdm import tqdm

    from crd_jax.registration.allocator import release_free_memory
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, register_volumes
    from crd_jax.outputs import OutputSet

    pairs = read_pairs_csv(args.pairs)
    from crd_jax.data.io import check_input_file

    for row in pairs:  # every input exists before the first registration
        for path in filter(None, row[:3]):
            check_input_file(path)
    out = Path(args.out_dir)
    outputs = [OutputSet(out / name, _register_names(args, bool(seg)), args.overwrite, family=_register_family(args))
               for _, _, seg, name in pairs]
    loaded = load(_model_path(args.model))
    _check_model_options(args, loaded)
    kwargs = registration_kwargs(args)
    t0 = time.perf_counter()
    log = []
    bar = tqdm(total=len(pairs), desc="registering", unit="pair", file=sys.stderr, dynamic_ncols=True,
               disable=None)  # on a terminal only: in a log, an error stays the one line on stderr
    for (fixed_path, moving_path, seg_path, name), outset in zip(pairs, outputs):
        fixed, moving, moving_seg, _ = load_pair(loaded, fixed_path, moving_path, seg_path)
        t = time.perf_counter()
        result, notes = register_volumes(loaded, fixed, moving, moving_seg, jacobian=args.jacobian, **kwargs)
        record = _registration_record(args, loaded, fixed_path, moving_path, seg_path, result, notes, time.perf_counter() - t)
        fixed, moving, moving_seg = _geometry_only(fixed), _geometry_only(moving), None
        with outset as stage:
            _write_registration(stage, args, result, fixed, moving, record)
        log.append(f"{name}: {time.perf_counter() - t:.2f} s, folds {result['folds']}"
                   + (f"; warning: {result['warning']}" if result.get("warning") else ""))
        del result  # the next pair's inputs must not sit beside this pair's field and warped volumes
        release_free_memory()
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    for line in log:
        print(line)
    print(f"note: convolution: {_conv_path(args)}")
    print(f"registered {len(pairs)} pair{'' if len(pairs) == 1 else 's'} with {loaded.spec.get('label', 'model')} in {wall:.1f} s "
          f"({len(pairs) / wall:.2f} pairs/s; the first includes compilation) into {out}")


def cmd_apply(args) -> None:
    import numpy as np

    from crd_jax import transforms
    from crd_jax.data.io import check_input_file, load_image, load_labels, save_nifti
    from crd_jax.interop.formats import read_displacement
    from crd_jax.outputs import OutputSet

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
        warped = _stored_label_dtype(np.asarray(warped), vol)
    with outputs as stage:
        save_nifti(stage / out.name, warped, reference.affine, None)
    print(f"warped {args.image} ({args.interpolation}) onto {args.reference} -> {out} in {time.perf_counter() - t0:.2f} s "
          "(reading, warping and writing)")


def _stored_label_dtype(warped, vol):
    """Warped labels in the integer type the label file stored (uint8 in, uint8 out), else :func:`label_dtype`."""
    import numpy as np

    try:
        stored = np.dtype(vol.header.get_data_dtype())
    except (AttributeError, TypeError):
        stored = None
    if stored is not None and stored.kind in "iu":
        info = np.iinfo(stored)
        if warped.size == 0 or (warped.min() >= info.min and warped.max() <= info.max):
            return warped.astype(stored, copy=False)
    return label_dtype(warped)


def read_points(path) -> "np.ndarray":
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


def _read_pairs(path: str, ids: List[str]):
    from crd_jax.data.io import check_input_file

    check_input_file(path, "a CSV file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except OSError as exc:
        raise InputError(path, f"unreadable pairs file ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"not a CSV text file in UTF-8 ({type(exc).__name__})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["moving", "fixed"]:
        rows = rows[1:]
    pairs = []
    for n, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise InputError(path, f"line {n}: expected 'moving,fixed'")
        m, f = row[0].strip(), row[1].strip()
        for sid in (m, f):
            if sid not in ids:
                raise InputError(path, f"line {n}: unknown subject '{sid}'")
        pairs.append((ids.index(m), ids.index(f)))
    if not pairs:
        raise InputError(path, "no pairs")
    return pairs


def cmd_evaluate(args) -> None:
    import numpy as np

    from crd_jax.registration.model import load
    from crd_jax.data import build_datasets, dataset_labels, eval_pairs
    from crd_jax.outputs import OutputSet
    from crd_jax.evaluation import evaluate_pairs, measure_inference, summarize

    if args.max_pairs < 0:
        raise InputError("--max-pairs", f"must be 0 (every pair) or more, got {args.max_pairs}")
    if not 1 <= args.timing_repeats <= 10000:
        raise InputError("--timing-repeats", f"must be between 1 and 10000, got {args.timing_repeats}")
    if not args.config and not args.data_root:
        raise InputError("evaluate", "needs --data-root DIR (DIR/images, DIR/labels) or --config")
    config = _load_config(args.config) if args.config else None
    synthetic = config is not None and config.data.kind == "synthetic"
    resolution = args.resolution or ("model" if synthetic else "files")
    if resolution == "model" and config is None:
        raise InputError("--resolution", "model needs --config (the model-grid evaluation reads the config's dataset)")
    if resolution == "files" and synthetic:
        raise InputError("--resolution", "files needs image files; a synthetic config has none (use --resolution model)")
    if resolution == "model" and args.subjects:
        raise InputError("--subjects", "selects files for --resolution files; with --resolution model use --split")
    if resolution == "files":
        return _evaluate_files(args, config)
    outputs = OutputSet(args.out_dir, ["metrics.csv", "summary.md", "summary.json"], args.overwrite)
    loaded = load(_model_path(args.model))
    if args.data_root:
        config.data.root = args.data_root
    multiple = int(loaded.spec.get("preprocessing", {}).get("multiple", 32))
    datasets = build_datasets(config.data, multiple)
    split = args.split or config.eval.split
    if split not in datasets:
        raise InputError(args.config, f"no '{split}' split in this dataset")
    ds = datasets[split]
    if not ds.has_labels:
        raise InputError(args.config, f"the '{split}' split has no label maps to evaluate against")
    pairs = _read_pairs(args.pairs, ds.ids) if args.pairs else eval_pairs(len(ds), config.data.eval_pairs, group_size=getattr(ds, "group_size", None))
    if args.max_pairs > 0:
        pairs = pairs[: args.max_pairs]
    labels = dataset_labels(config.data, ds)
    eff = measure_inference(loaded.model, loaded.params, ds.shape, repeats=args.timing_repeats)
    rows = []
    for m, f in pairs:
        t = time.perf_counter()
        row = evaluate_pairs(loaded.model, loaded.params, ds, [(m, f)], labels, hd95=not args.no_hd95)[0]
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{row['moving']} -> {row['fixed']}: Dice {row['dice']:.3f}, folds {row['folds']}")
    summary = summarize(rows)
    summary["resolution"] = "model"
    summary.update({k: eff[k] for k in ("latency_s", "compile_s", "memory_mb") if k in eff})
    header = ["moving", "fixed", "dice", *[f"dice_{l}" for l in labels], "hd95", "folds", "percent_folds", "sdlogj", "seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow([r["moving"], r["fixed"], f"{r['dice']:.5f}", *["" if d is None else f"{d:.5f}" for d in r["dice_per_label"]],
                         f"{r.get('hd95', float('nan')):.4f}", r["folds"], f"{r['percent_folds']:.5f}", f"{r['sdlogj']:.5f}",
                         f"{r['seconds']:.3f}"])
    lines = [f"{loaded.spec.get('label', 'model')} on {len(rows)} {split} pairs ({args.config})", "",
             "| metric | mean | std |", "|---|---|---|"]
    for key in ("dice", "dice_before", "hd95", "folds", "percent_folds", "sdlogj"):
        if f"{key}_mean" in summary:
            lines.append(f"| {key} | {summary[key + '_mean']:.4f} | {summary[key + '_std']:.4f} |")
    lines += ["", f"Dice on the model's grid (the {'x'.join(map(str, ds.shape))} canvas the network sees), not at the files' "
              "resolution (--resolution files).",
              "", f"Inference: {eff['latency_s']:.3f} s per pair (median of {args.timing_repeats}), compile {eff['compile_s']:.1f} s, "
              f"XLA memory {eff.get('memory_mb', float('nan')):.0f} MB, on the {'x'.join(map(str, ds.shape))} canvas."]
    table = "\n".join(lines) + "\n"
    if not all(np.isfinite(v) for v in summary.values() if isinstance(v, float)):
        raise InputError(args.model, "evaluation produced NaN/Inf metrics; nothing was written")
    _write_evaluation(outputs, buf.getvalue(), table, summary)


def _write_evaluation(outputs, metrics_csv: str, table: str, summary) -> None:
    """``evaluate``'s output set (per-pair CSV, the table, the summary), all at once."""
    with outputs as stage:
        (stage / "metrics.csv").write_text(metrics_csv)
        (stage / "summary.md").write_text(table)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print("wrote " + ", ".join(map(str, outputs.paths())))


SUBJECT_RANGE = re.compile(r"(?P<prefix>[A-Za-z_.-]*?)(?P<a>\d+)-(?P=prefix)?(?P<b>\d+)")


def parse_subjects(spec: str, ids: List[str], where) -> List[str]:
    """``--subjects``: ids, ranges ``S01-S10`` (the same prefix, numbers inclusive, the first number's width) or
    both, comma-separated, in the given order without repeats; every id must be one of ``ids``."""
    chosen: List[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = SUBJECT_RANGE.fullmatch(part)
        if part in ids or not m:
            names = [part]
        else:
            lo, hi = int(m.group("a")), int(m.group("b"))
            if lo > hi:
                raise InputError("--subjects", f"range {part!r} runs backwards")
            names = [f"{m.group('prefix')}{i:0{len(m.group('a'))}d}" for i in range(lo, hi + 1)]
        missing = [n for n in names if n not in ids]
        if missing:
            shown = ", ".join(ids[:3]) + (f", ... {ids[-1]}" if len(ids) > 3 else "")
            raise InputError("--subjects", f"no subject {', '.join(missing[:5])} in {where} (it has {len(ids)}: {shown})")
        chosen += [n for n in names if n not in chosen]
    if len(chosen) < 2:
        raise InputError("--subjects", f"{spec!r} selects {len(chosen)} subject(s); a pair needs at least 2")
    return chosen


def _evaluate_files(args, config) -> None:
    """``evaluate`` at the files' resolution: each pair registered as ``crd-jax register`` does, Dice of the
    warped labels against the fixed labels on the fixed image's own grid."""
    import numpy as np

    from crd_jax import metrics
    from crd_jax.registration.model import load
    from crd_jax.registration.pipeline import load_pair, onto_grid_labels, register_volumes
    from crd_jax.data.layouts import label_protocol, list_subjects, select
    from crd_jax.evaluation import summarize
    from crd_jax.registration.space import same_grid
    from crd_jax.outputs import OutputSet

    root = args.data_root or config.data.root
    if config is not None:
        kwargs = {"images": config.data.images_dir, "labels": config.data.labels_dir} if config.data.kind == "folder" else {}
        subjects = list_subjects(config.data.kind, root, **kwargs)
    else:
        if args.split:
            raise InputError("--split", "names a config's split; without --config pick subjects with --subjects")
        subjects = list_subjects("folder", root)
    by_id = {s.id: s for s in subjects}
    if args.subjects:
        chosen = [by_id[i] for i in parse_subjects(args.subjects, [s.id for s in subjects], root)]
    elif config is not None:
        split = args.split or config.eval.split
        if split not in config.data.splits:
            raise InputError(args.config, f"no '{split}' split in this config (its splits: {', '.join(config.data.splits)})")
        chosen = select(subjects, config.data.splits[split])
    else:
        chosen = [s for s in subjects if s.labels]
    unlabelled = [s for s in chosen if not s.labels]
    if unlabelled:
        raise InputError(unlabelled[0].image, "has no label map to evaluate against (expected in the labels folder, same name)")
    ids = [s.id for s in chosen]
    pairs = _read_pairs(args.pairs, ids) if args.pairs else [(m, f) for f in range(len(ids)) for m in range(len(ids)) if m != f]
    if args.max_pairs > 0:
        pairs = pairs[: args.max_pairs]
    outputs = OutputSet(args.out_dir, ["metrics.csv", "summary.md", "summary.json"], args.overwrite)
    kwargs = registration_kwargs(args)
    loaded = load(_model_path(args.model))
    labels = None
    if config is not None and config.data.labels != "auto":
        labels = label_protocol(config.data.labels if isinstance(config.data.labels, str) else list(config.data.labels))
    rows, grids = [], set()
    for m, f in pairs:
        fs, ms = chosen[f], chosen[m]
        fixed, moving, moving_seg, fixed_seg = load_pair(loaded, fs.image, ms.image, ms.labels, fs.labels)
        fixed_labels = _fixed_labels_on_grid(fixed_seg, fixed)
        if labels is None:  # every nonzero label of the first fixed label map
            labels = [int(v) for v in np.unique(fixed_labels) if v != 0]
        before = moving_seg.data if same_grid(moving_seg, fixed) else onto_grid_labels(moving_seg, fixed)
        t = time.perf_counter()
        result, _ = register_volumes(loaded, fixed, moving, moving_seg, **kwargs)
        seconds = time.perf_counter() - t
        dice = metrics.dice(result["warped_seg"], fixed_labels, labels)
        row = {"moving": ms.id, "fixed": fs.id, "dice": float(np.nanmean(dice)),
               "dice_per_label": [None if np.isnan(d) else float(d) for d in dice],
               "dice_before": float(np.nanmean(metrics.dice(before, fixed_labels, labels))),
               "folds": int(result["folds"]), "percent_folds": 100.0 * int(result["folds"]) / fixed.data.size,
               "sdlogj": metrics.sdlogj(result["disp"]), "seconds": seconds}
        if not args.no_hd95:
            row["hd95"] = float(np.nanmean(metrics.hd95(result["warped_seg"], fixed_labels, labels, fixed.spacing)))
        grids.add(f"{'x'.join(map(str, fixed.data.shape))} of {' x '.join(f'{v:g}' for v in fixed.spacing)} mm")
        rows.append(row)
        print(f"{ms.id} -> {fs.id}: Dice {row['dice']:.3f} (before {row['dice_before']:.3f}), folds {row['folds']}, {seconds:.1f} s")
    summary = summarize(rows)
    summary.update({"resolution": "files", "grids": sorted(grids), "options": {k: v for k, v in kwargs.items()},
                    "seconds_median": float(np.median([r["seconds"] for r in rows]))})
    header = ["moving", "fixed", "dice", *[f"dice_{l}" for l in labels], "dice_before", "hd95", "folds", "percent_folds",
              "sdlogj", "seconds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow([r["moving"], r["fixed"], f"{r['dice']:.5f}", *["" if d is None else f"{d:.5f}" for d in r["dice_per_label"]],
                         f"{r['dice_before']:.5f}", f"{r.get('hd95', float('nan')):.4f}", r["folds"], f"{r['percent_folds']:.5f}",
                         f"{r['sdlogj']:.5f}", f"{r['seconds']:.3f}"])
    options = f"affine {kwargs['affine'] or 'off'}, {kwargs['io_steps']} io steps, normalize {kwargs['normalize_mode']}"
    lines = [f"{loaded.spec.get('label', 'model')} on {len(rows)} pairs of {', '.join(ids) if len(ids) <= 8 else ids[0] + ' ... ' + ids[-1]} "
             f"({root}); {len(labels)} labels; {options}", "", "| metric | mean | std |", "|---|---|---|"]
    for key in ("dice", "dice_before", "hd95", "folds", "percent_folds", "sdlogj"):
        if f"{key}_mean" in summary:
            lines.append(f"| {key} | {summary[key + '_mean']:.4f} | {summary[key + '_std']:.4f} |")
    lines += ["", f"Dice at the files' resolution: each warped label map against the fixed labels on the fixed image's own "
              f"grid ({'; '.join(sorted(grids))}), not the model's grid (--resolution model). "
              f"{summary['seconds_median']:.2f} s per pair (median; registration, as crd-jax register)."]
    table = "\n".join(lines) + "\n"
    _write_evaluation(outputs, buf.getvalue(), table, summary)


def cmd_figure(args) -> None:
    from crd_jax.cli.figure import display_spacing, pair_figure, to_display
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
        from crd_jax.registration.pipeline import load_pair, register_volumes

        loaded = load(_model_path(args.model))
        fixed, moving, moving_seg, fixed_seg_vol = load_pair(loaded, args.fixed, args.moving, args.moving_seg, args.fixed_seg)
        fixed_seg = _fixed_labels_on_grid(fixed_seg_vol, fixed)
        result, notes = register_volumes(loaded, fixed, moving, moving_seg, **registration_kwargs(args))
        for note in notes:
            print(f"note: {note}")
        if result.get("warning"):
            warning = result["warning"]
        from crd_jax.registration.space import onto_grid, same_grid

        moving_shown = moving.data if same_grid(fixed, moving) else onto_grid(moving, fixed, order=1)
        warped, disp, warped_seg = result["warped"], result["disp"], result.get("warped_seg")
        title = f"{Path(args.moving).name} -> {Path(args.fixed).name} ({loaded.spec.get('label', '')})"
    spacing = display_spacing(fixed.affine) if fixed.data.ndim == 3 else None
    if fixed.data.ndim == 3:
        shown, disp = to_display(fixed.affine, {"fixed": fixed.data, "moving": moving_shown, "warped": warped,
                                                "fixed_seg": fixed_seg, "warped_seg": warped_seg}, disp)
    else:
        shown = {"fixed": fixed.data, "moving": moving_shown, "warped": warped, "fixed_seg": fixed_seg, "warped_seg": warped_seg}
    with outputs as stage:
        pair_figure(stage / out.name, shown["fixed"], shown["moving"], shown["warped"], disp, shown["fixed_seg"],
                    shown["warped_seg"], title=title, spacing=spacing)
    if warning:
        print(f"crd-jax: warning: {warning}", file=sys.stderr)
    print(f"wrote {out}")


def _fixed_labels_on_grid(fixed_seg, fixed):
    """The fixed label map's voxels on the fixed grid (checked to cover it), or ``None``."""
    if fixed_seg is None:
        return None
    from crd_jax.registration.checks import check_label_grid
    from crd_jax.registration.pipeline import onto_grid_labels
    from crd_jax.registration.space import same_grid

    check_label_grid(fixed_seg, fixed, "fixed image")
    return fixed_seg.data if same_grid(fixed_seg, fixed) else onto_grid_labels(fixed_seg, fixed)


def _saved_registration(args):
    """What ``figure --from OUT_DIR`` draws, read from a ``crd-jax register`` output folder (no model is loaded
    and nothing is registered): the fixed and moving images named by its ``registration.json`` (or
    ``--fixed``/``--moving``), its ``warped``, ``warped_seg`` (when present) and displacement files."""
    from crd_jax.data.io import load_image, load_labels
    from crd_jax.registration.space import onto_grid, same_grid
    from crd_jax.interop.formats import read_displacement

    folder = Path(args.from_dir)
    if not folder.is_dir():
        raise InputError(folder, "no such folder (--from takes the --out-dir of crd-jax register)")
    record = {}
    if (folder / "registration.json").is_file():
        try:
            record = json.loads((folder / "registration.json").read_text())
            assert isinstance(record, dict)
        except (OSError, ValueError, UnicodeDecodeError, AssertionError):
            raise InputError(folder / "registration.json", "unreadable registration record (not a JSON object)") from None

    def first(*names):
        return next((folder / n for n in names if (folder / n).is_file()), None)

    fixed_path, moving_path = args.fixed or record.get("fixed"), args.moving or record.get("moving")
    if not (fixed_path and moving_path):
        raise InputError(folder, "no registration.json naming the fixed and moving images; pass --fixed and --moving")
    warped_path = first("warped.nii.gz", "warped.nii")
    disp_path = first("disp.nii.gz", "disp.nii", "disp_itk.nii.gz", "disp_itk.nii")
    if warped_path is None or disp_path is None:
        raise InputError(folder, "not a crd-jax register output folder (no warped.nii[.gz] and disp[_itk].nii[.gz])")
    fixed = load_image(fixed_path, require_orientation=True)
    moving = load_image(moving_path, require_orientation=True)
    warped = load_image(warped_path)
    if warped.data.shape != fixed.data.shape:
        raise InputError(warped_path, f"shape {warped.data.shape} differs from the fixed image's {fixed.data.shape} "
                                      f"({fixed_path}): not this pair's registration")
    disp = read_displacement(disp_path, fixed)
    seg_path = first("warped_seg.nii.gz", "warped_seg.nii")
    warped_seg = load_labels(seg_path).data if seg_path is not None else None
    if warped_seg is not None and warped_seg.shape != fixed.data.shape:
        raise InputError(seg_path, f"shape {warped_seg.shape} differs from the fixed image's {fixed.data.shape}")
    fixed_seg = _fixed_labels_on_grid(load_labels(args.fixed_seg, require_orientation=True) if args.fixed_seg else None, fixed)
    moving_shown = moving.data if same_grid(fixed, moving) else onto_grid(moving, fixed, order=1)
    print(f"figure: drawn from the saved registration in {folder} (no model loaded, nothing registered)")
    label = record.get("model_label", "")
    title = f"{Path(moving_path).name} -> {Path(fixed_path).name}" + (f" ({label})" if label else "")
    return fixed, moving_shown, warped.data, disp, fixed_seg, warped_seg, title


def cmd_convert(args) -> None:
    from crd_jax.interop import official
    from crd_jax.interop.torch_legacy import load_legacy_checkpoint
    from crd_jax.outputs import check_writable_folder
    from crd_jax.model_io import is_model_folder, save_model

    out = check_writable_folder(args.out, "model folder")
    if out.exists() and not is_model_folder(out):
        raise InputError(out, "exists and is not a crd-jax model folder; nothing was changed (choose a new folder)")
    if out.exists() and not args.overwrite:
        raise InputError(out, "a model folder exists there; pass --overwrite to replace it")
    state = load_legacy_checkpoint(args.checkpoint)
    params, spec = official.convert(state, args.kind, source=args.checkpoint)
    spec["source"] = str(args.checkpoint)
    save_model(out, params, spec, overwrite=args.overwrite)
    print(f"converted {args.checkpoint} ({args.kind}) -> {out}")


def cmd_export(args) -> None:
    import numpy as np

    from crd_jax.data.io import load_image, read_nifti_array
    from crd_jax.interop.formats import displacement_names, write_displacement
    from crd_jax.outputs import OutputSet

    ids = _pair_ids(args)
    outputs = OutputSet(args.out_dir, displacement_names(args.format, pair_ids=ids), args.overwrite)
    fixed = load_image(args.fixed, require_orientation=True)
    disp = read_nifti_array(args.disp)
    if disp.shape != (*fixed.data.shape, 3):
        raise InputError(args.disp, f"expected a voxel displacement of shape {(*fixed.data.shape, 3)}, got {disp.shape}")
    bad = int((~np.isfinite(disp)).sum())
    if bad:
        raise InputError(args.disp, f"displacement holds {bad} NaN/Inf values")
    with outputs as stage:
        write_displacement(stage, disp, fixed, args.format, pair_ids=ids)
    for path in outputs.paths():
        print(f"wrote {path}")


MODEL_HELP = ("a shipped model's name (`crd-jax models`) or a model folder (default: lpba40-vm-ll-crd, the distilled "
              "VM-LL student: the fastest shipped model, not the most accurate)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors (an unknown option, a missing or malformed value) as the one line the contract promises,
    status 2; the usage block is what ``--help`` prints."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: the package, JAX and the convolution path this machine runs."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print versions and the convolution path, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import jax

        import crd_jax
        from crd_jax.ops import native

        conv = native.describe()
        bf16 = native.describe_bf16() or "unavailable on this CPU"
        print(f"crd-jax {crd_jax.__version__}, jax {jax.__version__} on {jax.default_backend()}; convolution: {conv}; "
              f"--bf16: {bf16}")
        parser.exit()


def _conv_path(args) -> str:
    """The convolution path for the log, with what ``--bf16`` did."""
    from crd_jax.ops import native

    path = native.describe()
    if getattr(args, "bf16", False):
        path += f", bfloat16 inputs and weights (--bf16, {native.bf16_engine()})" if native.has_bf16() else (
            "; --bf16 ignored: needs the native kernel on a CPU with AVX512-BF16, float32 used")
        speedup = native.bf16_speedup()
        if 0 < speedup < BF16_WORTHWHILE:
            path += (f"; this CPU's bfloat16 dot products run at {speedup:.2f}x its float32 multiply-add rate, "
                     "so --bf16 is unlikely to be faster here (float32 is exact)")
    return path


# --bf16 doubles the multiply-adds per instruction; where the CPU issues those instructions at less than this
# fraction of that gain (Intel Sapphire Rapids without its AMX tiles: ~0.5x float32's rate, measured) the log
# says it will not pay.
BF16_WORTHWHILE = 1.2


def add_registration_options(p: argparse.ArgumentParser) -> None:
    """The options that change how a pair is registered (``register`` and ``figure`` share them)."""
    p.add_argument("--normalize", choices=("model", "none", "minmax", "percentile"), default="model",
                   help="intensity normalisation of the inputs (default: as the model was trained)")
    p.add_argument("--quality", choices=("fast", "accurate"), default="fast",
                   help="fast (default): affine pre-alignment + the model's field; accurate: also --io-steps 50 "
                   "(LPBA40 at 1 mm, 2 CPU cores: " + PRESET_COST + "; docs/cli.md has the table)")
    p.add_argument("--io-steps", type=int, default=None,
                   help="instance optimisation: fine-tune the predicted field on this pair for N Adam steps at the model's "
                   "own resolution (NCC + smoothness; uniGradICON uses 50). Default: 0, or 50 with --quality accurate")
    p.add_argument("--affine", nargs="?", const="ncc", choices=("ncc", "mi"), default=None,
                   help="affine pre-alignment before the deformable model (intensity-based, coarse to fine, optax), on by "
                   "default: ncc (default) or mi for multi-modal pairs; register writes affine.txt (RAS) and affine_itk.txt (ITK)")
    p.add_argument("--no-affine", action="store_true",
                   help="skip the affine pre-alignment (for pairs already affinely aligned; a one-line warning when the "
                   "images' centroids are far apart)")
    p.add_argument("--bf16", action="store_true",
                   help="the network's convolutions with bfloat16 inputs and weights (float32 sums) on CPUs with "
                   "AVX512-BF16: faster, fields within ~0.1 voxel of float32 (see the README); elsewhere float32")


# What the presets cost: benchmarks/register_options.py on LPBA40 S35-S40 at 1 mm, AMD EPYC, 2 cores; the seconds
# from its last run on a quiet machine (--affine 3.1 s, --affine --io-steps 50 5.0 s per pair, 30 pairs), the
# Dice gain from benchmarks/results/register_options.json (accurate - fast; tests/test_first_hour.py checks it)
PRESET_COST = "fast about 3 s per pair, accurate about 5 s, for about +0.05 Dice"


def resolve_registration_options(args) -> None:
    """``--quality``, ``--affine``, ``--no-affine`` and ``--io-steps`` made concrete on ``args`` (idempotent):
    ``args.affine`` becomes ``"ncc"``, ``"mi"`` or ``""`` and ``args.io_steps`` a number; explicit options win
    over the preset."""
    if getattr(args, "_options_resolved", False):
        return
    if args.no_affine and args.affine:
        raise InputError("--no-affine", f"contradicts --affine {args.affine}; give one of them")
    args.affine = "" if args.no_affine else (args.affine or "ncc")
    if args.io_steps is None:
        args.io_steps = 50 if args.quality == "accurate" else 0
    args._options_resolved = True


def registration_kwargs(args) -> dict:
    """``register_volumes`` keywords from the options of :func:`add_registration_options` (``--bf16`` is set
    for the process here, before anything is traced)."""
    resolve_registration_options(args)
    if args.io_steps < 0:
        raise InputError("--io-steps", f"must be 0 or more, got {args.io_steps}")
    if getattr(args, "bf16", False):
        from crd_jax.ops.conv import bf16_inference

        bf16_inference(True)
    return {"normalize_mode": args.normalize, "io_steps": args.io_steps,
            "affine": "ncc" if args.affine == "ncc" else ("nmi" if args.affine else "")}


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="crd-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "register", help="register a moving image to a fixed image",
        description="Registers MOVING to FIXED with a trained model and writes the results on FIXED's grid. Inputs may "
        "have any orientation, voxel size and size; intensities as the model was trained on (shipped LPBA40 models: "
        "skull-stripped T1 in [0, 1]; see `crd-jax models`). Writes warped.nii.gz, warped_seg.nii.gz (with --moving-seg), "
        "the displacement (disp.nii.gz, disp_itk.nii.gz or disp_FFFF_MMMM.npz/.nii.gz), and with the options "
        "jacobian.nii.gz, inverse_disp.nii.gz, affine.txt and affine_itk.txt; all at once, never over existing files "
        "without --overwrite. --pairs registers a CSV of pairs in one process. Compiled programs are cached in "
        "~/.cache/crd_jax (CRD_JAX_CACHE_DIR), so later calls start faster.",
        epilog="example: crd-jax register --model lpba40-vm-ll-crd --fixed S01.nii.gz --moving S02.nii.gz "
        "--moving-seg S02_labels.nii.gz --out-dir out/ --disp-format itk")
    r.add_argument("--model", help="a shipped model's name (see `crd-jax models`; default: lpba40-vm-ll-crd, the distilled "
                   "1/4-resolution student: the fastest shipped model; lpba40-vm-h, the full-resolution network, scores higher at more time and memory) "
                   "or a model folder (a training stage's 'model', or convert-official's output)")
    r.add_argument("--fixed", help="fixed image (.nii, .nii.gz or .npz)")
    r.add_argument("--moving", help="moving image; resampled onto the fixed grid first if grids differ")
    r.add_argument("--pairs", help="CSV of pairs 'fixed,moving[,moving_seg[,name]]' registered in one process (compiled "
                   "once, a progress bar); each pair's files go to OUT_DIR/NAME (default NAME: <moving>_to_<fixed>)")
    r.add_argument("--moving-seg", help="moving label map, warped with nearest neighbour")
    r.add_argument("--out-dir", required=True, help="folder for the outputs (created if missing; with --pairs, one "
                   "subfolder per pair)")
    r.add_argument("--disp-format", choices=("voxel", "itk", "learn2reg"), default="voxel",
                   help="voxel: ours (X,Y,Z,3) voxels; itk: ANTs/ITK/Slicer displacement field; learn2reg: disp_FFFF_MMMM.npz + .nii.gz")
    r.add_argument("--pair-ids", nargs=2, metavar=("FIXED_ID", "MOVING_ID"), help="ids in Learn2Reg file names")
    r.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    add_registration_options(r)
    r.add_argument("--uncompressed", action="store_true",
                   help="write .nii instead of .nii.gz (faster: compressing a float32 field saves little space)")
    r.add_argument("--jacobian", action="store_true", help="also write jacobian.nii.gz, det(I + grad u) on the fixed grid")
    r.add_argument("--inverse", action="store_true", help="also write the inverse displacement (inverse_disp*, fixed-point iteration)")
    r.set_defaults(func=cmd_register)

    a = sub.add_parser("apply", help="warp an image, a label map or points with a saved displacement",
                       description="Warps an image or label map (on any grid) onto the reference grid with a saved "
                       "displacement, or maps world points (CSV x,y,z in mm) from the reference to the moving image.",
                       epilog="example: crd-jax apply --disp out/disp.nii.gz --reference F.nii.gz --image M_seg.nii.gz "
                       "--labels --interpolation onehot --out M_seg_warped.nii.gz")
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
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a.set_defaults(func=cmd_apply)

    mo = sub.add_parser("models", help="list the models shipped with crd-jax",
                        description="Lists the shipped models: what each was trained on, its grid, voxel size and "
                        "orientation, the intensities it expects and its measured validation Dice.",
                        epilog="example: crd-jax models")
    mo.set_defaults(func=cmd_models)

    from crd_jax.cli import finetune as finetune_cli

    finetune_cli.add_parser(sub)

    e = sub.add_parser(
        "evaluate", help="Dice, HD95, folds, SDlogJ, time and memory over a dataset's pairs",
        description="Evaluates a model on every ordered pair of labelled subjects: a folder of your own (--data-root "
        "DIR with DIR/images/<id>.nii.gz and DIR/labels/<id>.nii.gz; --subjects picks them) or a dataset config's "
        "evaluation split. By default each pair is registered as crd-jax register does (same options) and Dice is "
        "measured at the files' resolution, on each fixed image's own grid; --resolution model measures it on the "
        "model's grid instead (needs --config). Writes metrics.csv (per pair), summary.md and summary.json into --out-dir; "
        "the table says which resolution.",
        epilog="example: crd-jax evaluate --model lpba40-vm-ll-crd --data-root /data/lpba40 --subjects S35-S37 "
        "--out-dir eval/")
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--config", help="a dataset config file (configs/*.py): its layout, split and label set (optional "
                   "with --data-root, which then reads DIR/images and DIR/labels)")
    e.add_argument("--data-root", help="the data folder (overrides config.data.root)")
    e.add_argument("--subjects", help="subjects to pair: ids, ranges or both, e.g. S01-S10 or S01,S03,S07-S09 "
                   "(default: the config's evaluation split, or every labelled subject of --data-root)")
    e.add_argument("--resolution", choices=("files", "model"), default=None,
                   help="where Dice is measured: files (default; the fixed image's own grid) or model (the model's "
                   "grid, the training evaluation; needs --config; the default for synthetic configs)")
    e.add_argument("--split", help="a split name of the config: train, val or test (default: config.eval.split); "
                   "for other subjects use --subjects")
    e.add_argument("--pairs", help="CSV of 'moving,fixed' subject ids (default: every ordered pair, or the config's "
                   "evaluation pairs)")
    e.add_argument("--max-pairs", type=int, default=0, help="evaluate only the first N pairs (default 0: every pair)")
    e.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest metric)")
    e.add_argument("--timing-repeats", type=int, default=5,
                   help="inference runs timed for the latency (median; default 5)")
    e.add_argument("--out-dir", default="evaluation", help="folder for metrics.csv, summary.md and summary.json "
                   "(default: evaluation)")
    e.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    add_registration_options(e)
    e.set_defaults(func=cmd_evaluate)

    f = sub.add_parser(
        "figure", help="a PNG or PDF like the paper's Fig. 4 for one pair",
        description=textwrap.fill("Draws fixed, moving, warped (with the label overlap when both label maps are given, the warped "
        "labels alone when only the moving ones are), the deformed grid and the error map on the axial, coronal and "
        "sagittal mid-slices in radiological orientation (patient right on the viewer's left). --from OUT_DIR draws "
        "the registration crd-jax register saved there (no model, nothing registered again); otherwise the pair is "
        "registered first. Writes the one file --out (.png or .pdf).", 100),
        epilog="example: crd-jax figure --from out/ --out out/overview.png\n"
        "example: crd-jax figure --model lpba40-vm-ll-crd --fixed F.nii.gz --moving M.nii.gz --fixed-seg FS.nii.gz "
        "--moving-seg MS.nii.gz --out pair.pdf", formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--from", dest="from_dir", metavar="OUT_DIR",
                   help="a crd-jax register output folder: draw its saved result (its registration.json names the "
                   "fixed and moving images; --fixed/--moving override it)")
    f.add_argument("--model", help=MODEL_HELP + "; not with --from")
    f.add_argument("--fixed", help="fixed image (.nii, .nii.gz or .npz)")
    f.add_argument("--moving", help="moving image (any grid; resampled onto the fixed grid)")
    f.add_argument("--fixed-seg", help="fixed label map: the warped labels are drawn against it (agree / disagree)")
    f.add_argument("--moving-seg", help="moving label map: warped and drawn over the warped image")
    f.add_argument("--out", required=True, help="PNG (or PDF) to write")
    f.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    add_registration_options(f)
    f.set_defaults(func=cmd_figure)

    c = sub.add_parser(
        "convert-official", help="the authors' PyTorch checkpoint -> a crd-jax model folder (no torch needed)",
        description="Converts a legacy .pth of the authors' released CRD code into a model folder (model.json + "
        "params.msgpack). The models take OASIS aligned_norm volumes as stored: intensities in [0, 1].",
        epilog="example: crd-jax convert-official --checkpoint VMdalca1_Hinput_OASIS_R1_D_24500.pth --kind student "
        "--out models/crd_oasis_student")
    c.add_argument("--checkpoint", required=True, help="legacy torch .pth (e.g. VMdalca1_Hinput_OASIS_R1_D_24500.pth)")
    c.add_argument("--kind", choices=("student", "teacher"), required=True,
                   help="which of the authors' networks the checkpoint holds")
    c.add_argument("--out", required=True, help="model folder to write (a new folder)")
    c.add_argument("--overwrite", action="store_true", help="replace a crd-jax model folder that exists there")
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser(
        "export", help="convert a voxel displacement (ours) to the ITK or Learn2Reg format",
        description="Writes a saved voxel displacement in another format into --out-dir: disp_itk.nii.gz (ITK/ANTs/Slicer, "
        "mm LPS) or disp_FFFF_MMMM.npz + .nii.gz (Learn2Reg).",
        epilog="example: crd-jax export --disp out/disp.nii.gz --fixed F.nii.gz --format itk --out-dir out/")
    x.add_argument("--disp", required=True, help="our displacement NIfTI (X,Y,Z,3), voxels")
    x.add_argument("--fixed", required=True, help="the fixed image it belongs to (geometry)")
    x.add_argument("--format", choices=("itk", "learn2reg", "voxel"), required=True,
                   help="itk: ANTs/ITK/Slicer field (mm, LPS); learn2reg: the challenge files; voxel: ours")
    x.add_argument("--pair-ids", nargs=2, metavar=("FIXED_ID", "MOVING_ID"), help="ids in Learn2Reg file names")
    x.add_argument("--out-dir", required=True, help="folder to write into (created if missing)")
    x.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    x.set_defaults(func=cmd_export)
    return p


def enable_compilation_cache() -> Optional[str]:
    """JAX's persistent compilation cache in the user's cache folder (:mod:`crd_jax.user_cache`, ``xla``), so
    that a second ``crd-jax`` call loads the compiled programs instead of compiling them again, and the
    registration path's whole programs (``executables``: loaded without tracing, :func:`crd_jax.compile.cache_executables`)."""
    from crd_jax.user_cache import cache_folder

    path = cache_folder("xla")
    if path is None:
        return None
    import jax

    from crd_jax.compile import cache_executables

    cache_executables(cache_folder("executables"))

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


MAX_THREADS_PER_CPU = 4  # CRD_JAX_NUM_THREADS above this many threads per CPU is capped


def cap_thread_count(environ=os.environ, prog: str = "crd-jax") -> Optional[int]:
    """``CRD_JAX_NUM_THREADS`` (the native kernel's thread pool) capped at ``MAX_THREADS_PER_CPU`` threads per
    CPU of the machine, with one warning line: 100,000 threads exhaust the system's thread limit (other
    processes then fail to start threads). Must run before the native kernel is loaded. Returns the cap applied."""
    value = environ.get("CRD_JAX_NUM_THREADS")
    if not value:
        return None
    cap = MAX_THREADS_PER_CPU * max(1, os.cpu_count() or 1)
    try:
        n = int(value)
    except ValueError:
        print(f"{prog}: warning: CRD_JAX_NUM_THREADS={value!r} is not a number; ignored", file=sys.stderr)
        del environ["CRD_JAX_NUM_THREADS"]
        return None
    if n > cap:
        print(f"{prog}: warning: CRD_JAX_NUM_THREADS={n} capped at {cap} ({MAX_THREADS_PER_CPU} per CPU)", file=sys.stderr)
        environ["CRD_JAX_NUM_THREADS"] = str(cap)
        return cap
    return None


def _raise_terminated(signum, frame):
    from crd_jax.outputs import Terminated

    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    import logging

    logging.getLogger("nibabel").setLevel(logging.ERROR)  # its header fix-up notes ("vox offset ... too low") are not ours to print
    from crd_jax.outputs import Terminated

    previous = None
    try:  # SIGTERM (a batch system's time limit, `kill`) ends the command like Ctrl-C: outputs cleaned, one line
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        pass
    try:
        if args.func not in (cmd_models,):
            enable_compilation_cache()
        args.func(args)
    except InputError as exc:
        print(f"crd-jax: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crd-jax: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("crd-jax: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def entry() -> None:
    from crd_jax.registration.allocator import return_large_blocks_to_the_system

    cap_thread_count()
    return_large_blocks_to_the_system()
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if status in (130, 143):
        # interrupted or terminated while XLA's threads may still hold work: the interpreter's teardown could
        # then end in a segmentation fault (seen after Ctrl-C during --io-steps); our files are settled (the
        # output set removed its staging folder), so leave at once with the status
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
