"""The whole CRD scheme from a config: every stage in order, then the results table.

``workdir/`` receives ``config.json`` (the resolved config), ``metrics.jsonl``, ``tensorboard/``,
``stages/<name>/{ckpt,model,eval.json}`` and finally ``results.json`` and ``results.md``.

Re-running the same command resumes: a stage whose ``model`` folder exists is loaded and skipped, the
running stage restarts from its latest checkpoint, finished evaluations are read back from ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from crd_jax.allocator import huge_page_malloc_note
from crd_jax.data import PairLoader, build_datasets, dataset_labels, eval_pairs
from crd_jax.data.augment import Augment
from crd_jax.data.io import atomic_path
from crd_jax.errors import InputError
from crd_jax.outputs import check_writable_folder
from crd_jax.models import build as mbuild
from crd_jax.ops import native
from crd_jax.training import distributed
from crd_jax.model_io import load_model, save_model
from crd_jax.evaluation import count_parameters, evaluate_pairs, measure_inference, predictor, summarize
from crd_jax.training.logging import MetricLogger
from crd_jax.training.loop import StageRun, train_stage
from crd_jax.training import diagnostics as diag
from crd_jax.training import stage_kinds
from crd_jax.training.stages import Trained, plan_stage
from crd_jax.training import teacher_cache

if TYPE_CHECKING:
    import ml_collections

    from crd_jax.data.pairs import Pair
    from crd_jax.typing import Dataset


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _atlas_index(dataset, atlas: str):
    if not atlas:
        return None
    ids = dataset.volumes.ids if hasattr(dataset, "volumes") else dataset.ids  # slice datasets: per subject
    if atlas not in ids:
        raise InputError("config.data.atlas", f"atlas '{atlas}' is not in this split")
    return ids.index(atlas)


def _stage_steps(config, st) -> int:
    steps = int(st.steps)
    cap = int(config.train.max_steps)
    return min(steps, cap) if cap > 0 else steps


def _preprocessing_spec(config, dataset, multiple: int) -> Dict:
    """How inputs must be prepared for the model (saved with it, used by ``crd-jax register``)."""
    from crd_jax.registration.space import geometry_of

    d = config.data
    sample = np.concatenate([np.ravel(dataset.image(i)) for i in range(min(4, len(dataset)))])
    try:
        record = geometry_of(dataset.volume(0)) if len(dataset.shape) == 3 and d.kind != "synthetic" else None
    except (AttributeError, InputError):
        record = None
    return {
        # orientation, voxel size and stored shape of the training data: register maps inputs into this space
        **({"geometry": record} if record else {}),
        # what inputs looked like in training: ``crd-jax register`` refuses images far from it
        "intensity": {"p1": float(np.percentile(sample, 1)), "p99": float(np.percentile(sample, 99)), "max": float(sample.max())},
        "normalize": d.normalize,
        "percentiles": list(d.percentiles),
        "resample_shape": list(d.resample_shape),
        "canvas_shape": list(dataset.shape),
        "multiple": int(multiple),
        "ndim": len(dataset.shape),
    }


def _validator(config, plan, datasets, labels):
    val = datasets.get("val")
    n_pairs = int(config.eval.val_pairs)
    if val is None or not val.has_labels or n_pairs <= 0 or len(val) < 2:
        return None
    pairs = eval_pairs(len(val), config.data.eval_pairs, group_size=getattr(val, "group_size", None))
    # spread the few validation pairs over the groups (slices) rather than taking the first ones
    pairs = pairs[:: max(1, len(pairs) // n_pairs)][:n_pairs]
    predict = predictor(plan.model)

    def validate(params):
        rows = evaluate_pairs(plan.model, plan.full_params(params), val, pairs, labels, predict=predict)
        s = summarize(rows)
        return {"dice": s["dice_mean"], "folds": s["folds_mean"]}

    return validate


def evaluation_pairs(config: ml_collections.ConfigDict, ds: Dataset) -> List[Pair]:
    """The (moving, fixed) pairs a stage is evaluated on (``config.data.eval_pairs``, ``eval.max_pairs``)."""
    pairs = eval_pairs(len(ds), config.data.eval_pairs, _atlas_index(ds, config.data.atlas), getattr(ds, "group_size", None))
    if int(config.eval.max_pairs) > 0:
        pairs = pairs[: int(config.eval.max_pairs)]
    return pairs


def evaluate_stage(
    config: ml_collections.ConfigDict,
    trained: Trained,
    datasets: Mapping[str, Dataset],
    labels: Sequence[int],
    directory: Path,
    logger: MetricLogger,
) -> Dict:
    """Accuracy on the evaluation split and efficiency at its resolution, cached in ``eval.json``."""
    cache = directory / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    split = config.eval.split
    ds = datasets.get(split)
    if ds is None:
        raise InputError(f"config.eval.split={split}", "no such split in the dataset")
    pairs = evaluation_pairs(config, ds)
    logger.info(f"[{trained.spec['stage']}] evaluating {trained.spec['label']} on {len(pairs)} {split} pairs")
    rows = evaluate_pairs(trained.model, trained.params, ds, pairs, labels, hd95=bool(config.eval.hd95))
    summary = summarize(rows)
    factor = int(trained.spec["factor"])
    spec = trained.spec
    model_params = trained.params
    efficiency = measure_inference(trained.model, model_params, ds.shape, repeats=int(config.eval.timing_repeats))
    input_shape = ds.shape if spec["kind"] == "teacher" else tuple(s // factor for s in ds.shape)
    result = {
        "label": spec["label"],
        "stage": spec["stage"],
        "kind": spec["kind"],
        "factor": factor,
        "input_shape": list(input_shape),
        "parameters": count_parameters(model_params),
        **summary,
        **efficiency,
        "conv": native.describe(),  # which convolution path the timings ran on
        "pairs": rows,
    }
    if jax.process_index() == 0:
        write_text(cache, json.dumps(result, indent=1))
    return result


def results_markdown(results: List[Dict], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| Model | Dice | Folds | Params | Input | Memory (MB) | Latency (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['dice_mean']:.3f} ({r['dice_std']:.3f}) | {r['folds_mean']:.1f} ({r['folds_std']:.1f}) "
            f"| {r['parameters']:,} | {'x'.join(map(str, r['input_shape']))} | {r.get('memory_mb', float('nan')):.1f} "
            f"| {r['latency_s']:.3f} |"
        )
    if results:
        lines += [
            "",
            f"Identity (no registration) Dice: {results[0]['dice_before_mean']:.3f} ({results[0]['dice_before_std']:.3f}); "
            f"{results[0]['num_pairs']} pairs. Memory: XLA's compiled footprint (arguments + outputs + temporaries) "
            "of one inference at batch 1; latency: median over repeated runs after compilation.",
        ]
    return "\n".join(lines) + "\n"


def network_multiple(config: ml_collections.ConfigDict) -> int:
    """Every canvas side must divide by ``2^(levels + k)`` for every model of every stage."""
    from crd_jax.training.stages import stage_model_config

    multiple = 1
    for name in config.pipeline:
        cfg = stage_model_config(config, config.stages[name])
        if cfg.get("backbone") != "affine":
            multiple = max(multiple, 2 ** (mbuild.levels(mbuild.architecture(cfg)) + int(cfg.get("shift", 1))))
    return multiple


def check_run_config(config: ml_collections.ConfigDict, workdir: Path) -> Dict[str, stage_kinds.StageConfig]:
    """What can be checked before anything is read or written: one-line errors for bad values."""
    from crd_jax.training.config_checks import check_bf16_training, check_values

    check_values(config)  # lr finite and positive, shapes and factors sane, ...
    check_bf16_training(config)  # train.bf16 only where the CPU runs bfloat16
    batch = config.train.batch_size
    if not isinstance(batch, int) or batch < 1:
        raise InputError("config.train.batch_size", f"must be a positive integer, got {batch!r}")
    if batch % jax.device_count():
        raise InputError("config.train.batch_size", f"{batch} is not divisible by {jax.device_count()} devices")
    typed = stage_kinds.parse_pipeline(config)  # unknown kinds, misspelt fields, references to later stages
    for st in typed.values():
        try:
            stage_augment(config, st)
        except ValueError as exc:
            raise InputError("config.data.augment", str(exc)) from None
    check_writable_folder(workdir, "workdir")
    # the lock file is the training process's own (workdir_config.lock; a driver may take it before this check)
    if workdir.is_dir() and any(p.name != ".lock" for p in workdir.iterdir()) and not (workdir / "config.json").exists():
        raise InputError(
            workdir, "workdir exists, is not empty and is not a crd-jax workdir (no config.json); choose a new folder"
        )
    return typed


def run(config: ml_collections.ConfigDict, allow_config_change: bool = False) -> List[Dict]:
    """Runs ``config.pipeline`` and writes the results; returns the result rows. A workdir run before refuses
    a config changed where it was already trained unless ``allow_config_change`` (:mod:`workdir_config`)."""
    distributed.initialize(config.distributed)
    workdir = Path(config.workdir).absolute()
    typed = check_run_config(config, workdir)
    # A workdir this call creates is removed again if the run fails before its first stage has saved anything
    # (fine-tuning's setup writes the user's scans, prepared, into it before the checks below).
    created, is_main = not workdir.exists(), jax.process_index() == 0
    from crd_jax.ops.conv import bf16_inference

    try:
        typed, datasets, labels, loader, example, multiple = _start(config, typed, workdir, allow_config_change)
        # Training is float32 outside train.bf16: CRD_JAX_CONV_BF16=1 (bfloat16 *inference*) must not round the
        # frozen teachers, S3's teacher cache (whose fingerprint does not record it) or the validation of a run.
        inference_bf16 = bf16_inference()
        bf16_inference(False)
        try:
            return _run_stages(config, typed, workdir, datasets, labels, loader, example, multiple, is_main)
        finally:
            bf16_inference(inference_bf16)
    except (InputError, ValueError, OSError) as exc:  # OSError: a full disk, a folder not ours
        _discard_failed_start(workdir, created, is_main, exc)
        raise


def _start(config: ml_collections.ConfigDict, typed, workdir: Path, allow_config_change: bool):
    """What a run reads before its first stage: ``(typed stages, datasets, label set, loader, first batch,
    network multiple)``. Only reads, except fine-tuning's setup (the prepared scans)."""
    from crd_jax.training import workdir_config

    if config.get("init_from"):  # fine-tuning: the user's scans mapped into the model's space, two stages
        from crd_jax.training import finetune

        finetune.setup(config)
        typed = stage_kinds.parse_pipeline(config)
    workdir_config.check_resume(config, workdir, allow_config_change)
    multiple = network_multiple(config)
    datasets = build_datasets(config.data, multiple)
    if "train" not in datasets:
        raise InputError("config.data.splits.train", "the training split is empty")
    for ds in datasets.values():
        ds.validate()
    from crd_jax.training.config_checks import check_training_split

    check_training_split(datasets["train"])
    labels = dataset_labels(config.data, datasets.get(config.eval.split, datasets["train"]))
    evaluating = [name for name, st in typed.items() if st.evaluate]
    if not labels and evaluating:  # data.labels = "none": nothing to score a stage with
        raise InputError(
            "config.data.labels",
            f"'none' scores nothing, but stage {evaluating[0]} evaluates (set its evaluate=False, or name the label set)",
        )
    train_ds = datasets["train"]
    loader = PairLoader(
        train_ds,
        int(config.train.batch_size),
        int(config.seed),
        jax.process_index(),
        jax.process_count(),
        atlas=_atlas_index(train_ds, config.data.atlas),
    )
    return typed, datasets, labels, loader, loader.batch(0), multiple


def _discard_failed_start(workdir: Path, created: bool, is_main: bool, exc: BaseException) -> None:
    """Removes a workdir this run created when it failed before any stage saved a checkpoint or a model."""
    from crd_jax.training import workdir_config

    if (
        created
        and is_main
        and not isinstance(exc, workdir_config.WorkdirBusy)
        and workdir.is_dir()
        and not any((workdir / "stages").glob("*/ckpt/*"))
        and not any((workdir / "stages").glob("*/model"))
    ):
        shutil.rmtree(workdir, ignore_errors=True)  # created by this call, holds only its own start files


def _load_pretrained(name: str, st, logger) -> Trained:
    from crd_jax.pretrained import resolve

    folder = resolve(st.path)
    params, spec = load_model(folder)
    logger.info(f"[{name}] loaded {folder} (not trained)")
    return Trained(mbuild.model_from_spec(spec), params, dict(spec, stage=name, label=st.label or folder.name))


def stage_augment(config: ml_collections.ConfigDict, st: stage_kinds.StageConfig) -> Augment:
    """The stage's augmentation: ``config.data.augment``, with the stage's own ``augment`` kind when set."""
    a = config.data.get("augment", None)
    base = Augment(str(a.kind), float(a.spacing), float(a.sigma)) if a is not None else Augment()
    return dataclasses.replace(base, kind=st.augment) if st.augment else base


def stage_loader(
    config: ml_collections.ConfigDict, st: stage_kinds.StageConfig, loader: PairLoader, labels: Optional[Sequence[int]]
) -> PairLoader:
    """The run's loader with the stage's pair stream (``seed``) and augmentation; batches carry label maps
    when the loss has a label-supervised term."""
    with_labels = float(config.loss.get("label_weight", 0.0)) > 0
    return loader.for_stage(st.seed, stage_augment(config, st), labels if with_labels else None)


def _run_stages(config, typed, workdir, datasets, labels, loader, example, multiple, is_main) -> List[Dict]:
    logger = MetricLogger(workdir, progress=bool(config.train.progress_bar))
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        from crd_jax.training import workdir_config

        workdir_config.lock(workdir)  # one training process per workdir
        workdir_config.record(config, workdir)  # config.json stays the first; changes go to config_history.jsonl
    mesh = distributed.data_mesh()
    train_ds = datasets["train"]
    logger.info(
        f"crd-jax: {len(train_ds)} training subjects of {'x'.join(map(str, train_ds.shape))}, "
        f"{jax.device_count()} device(s), {jax.process_count()} process(es), workdir {workdir}"
        + (f"; {note}" if (note := huge_page_malloc_note()) else "")
    )

    done: Dict[str, Trained] = {}
    teacher_caches: Dict = {}  # S3 teachers' outputs per training pair, shared by stages with one teacher
    results, diagnostics = [], []
    root_key = jax.random.PRNGKey(int(config.seed))
    for index, name in enumerate(config.pipeline):
        st = typed[name]
        if not st.trains:  # a finished model folder loaded as this stage's result (kind "pretrained")
            done[name] = _load_pretrained(name, st, logger)
            if st.evaluate and config.eval.split in datasets:
                results.append(evaluate_stage(config, done[name], datasets, labels, workdir / "stages" / name, logger))
            continue
        directory = workdir / "stages" / name
        model_dir = directory / "model"
        plan = plan_stage(name, st, config, done, jax.random.fold_in(root_key, index), example, len(labels))
        if model_dir.exists():
            params, _ = load_model(model_dir, like=plan.full_params(plan.init_params))
            logger.info(f"[{name}] finished earlier, loaded {model_dir}")
        else:
            steps = _stage_steps(config, st)
            loss_fn, loader_, why = teacher_cache.attach(
                plan.loss_fn,
                plan.frozen,
                stage_loader(config, st, loader, labels),
                example,
                float(config.train.get("teacher_cache_gb", 0.0)),
                teacher_caches,
                float(config.train.get("teacher_cache_disk_gb", 0.0)),
                workdir / "teacher_cache" / str(getattr(st, "teacher", name)),
                str(getattr(st, "teacher", "")),
            )
            if why:
                logger.info(f"[{name}] {why}")
            run_ = StageRun(
                name, loss_fn, plan.init_params, plan.frozen, steps, directory, _validator(config, plan, datasets, labels)
            )
            trained = train_stage(run_, loader_, mesh, config, logger)
            params = plan.full_params(trained)
            preprocessing = _preprocessing_spec(config, train_ds, multiple)
            if config.get("init_from"):  # new inputs still need the source model's normalisation
                from crd_jax.training import finetune

                preprocessing = finetune.exported_preprocessing(config, preprocessing)
            spec = dict(plan.spec, steps=steps, labels=labels, preprocessing=preprocessing)
            if config.get("init_from"):
                spec["finetuned_from"] = {"model": str(config.init_from), "steps": steps}
            if is_main:
                save_model(model_dir, params, spec)
            logger.info(f"[{name}] {steps} steps done -> {model_dir}")
        done[name] = Trained(plan.model, params, plan.spec)
        later = [getattr(typed[n], "teacher", "") for n in config.pipeline[index + 1 :]]
        teacher_cache.release_unused(teacher_caches, later)  # memory no later stage reads
        if st.evaluate:
            if config.eval.split not in datasets:
                logger.info(f"[{name}] no '{config.eval.split}' split: evaluation skipped")
            else:
                results.append(evaluate_stage(config, done[name], datasets, labels, directory, logger))
        if st.kind == "distill" and is_main and bool(config.eval.get("diagnostics", True)):
            saved = directory / "diagnostics.json"
            if saved.exists():  # the stage's model is final, so are its diagnostics (a resumed run skips them)
                row = json.loads(saved.read_text())
            else:
                logger.info(f"[{name}] diagnostics: ceilings, headroom, field distance, term gradients")
                evaluation = datasets.get(config.eval.split)
                row = diag.distill_diagnostics(
                    name,
                    st,
                    plan,
                    done,
                    datasets,
                    labels,
                    stage_loader(config, st, loader, labels),
                    config,
                    workdir,
                    evaluation_pairs(config, evaluation) if evaluation else [],
                )
                write_text(saved, json.dumps(row, indent=1))
            diagnostics.append(row)
            if results and results[-1]["stage"] == name:
                results[-1]["diagnostics"] = row

    if is_main and results:
        table = results_markdown(results, f"{config.get('name', 'crd-jax')} ({config.eval.split} split)")
        table += diag.diagnostics_markdown(diagnostics)
        slim = [{k: v for k, v in r.items() if k != "pairs"} for r in results]
        write_text(workdir / "results.json", json.dumps(slim, indent=2))
        write_text(workdir / "results.md", table)
        logger.info("\n" + table)
    logger.close()
    if is_main and results:
        print(f"results: {workdir / 'results.md'}", flush=True)
    return results
