"""What a distillation run can and cannot gain, measured every run (science issue, item 2).

For a student on a grid ``n = 2^k`` times coarser than the input, four numbers say whether cross-resolution
distillation has anything to transfer:

* **ceiling**: a high-resolution field (the teacher's ``up(phi^T)``, or VM-H's) averaged over each ``n^d``
  block onto the student's grid and upsampled back as the student's own ``up(phi^S)`` is (eq. 5). Its Dice is
  the best a student on that grid could reach by matching that field; ``ceiling - VM-L`` bounds CRD's gain.
* **headroom**: teacher and student Dice on a fixed set of *training* pairs (:func:`headroom_pairs`), where
  distillation acts. A teacher no better than the student there can only regularise.
* **field distance**: the RMS of ``up(phi^T) - up(phi^S)`` over the canvas (high-resolution voxels) on the
  same pairs, for the student's starting parameters and its trained ones.
* **term gradients**: the norm of the gradient of each term of eq. 10 (``L^L``, ``L_deformation``,
  ``L_feature``) with respect to the student's parameters at the start of S3, mean over a few batches of
  the stage's own pair stream, with each term's weight: whether a term is loud enough to matter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.evaluation import evaluate_pairs, predictor, summarize
from crd_jax.ops.spatial import upsample_field

if TYPE_CHECKING:
    from pathlib import Path

    import ml_collections

    from crd_jax.data.loader import PairLoader
    from crd_jax.typing import Dataset, Model, Params
    from crd_jax.training.stage_kinds import StageConfig
    from crd_jax.training.stages import StagePlan, Trained

#: how many fixed training pairs the headroom and distance use, and the seed that draws them
HEADROOM_PAIRS = 16
HEADROOM_SEED = 20261204
GRADIENT_BATCHES = 4


def headroom_pairs(num_subjects: int, count: int = HEADROOM_PAIRS, seed: int = HEADROOM_SEED) -> List[tuple]:
    """``count`` distinct ordered (moving, fixed) pairs of training subjects, a pure function of its arguments
    (the same pairs in every run over the same training split; no validation subject is involved)."""
    every = [(m, f) for m in range(num_subjects) for f in range(num_subjects) if m != f]
    if not every:
        return []
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(every), size=min(count, len(every)), replace=False)
    return [every[int(i)] for i in sorted(chosen)]


def block_mean_field(disp: jax.Array, factor: int) -> jax.Array:
    """A field ``(B, *spatial, d)`` in input voxels averaged over ``factor^d`` blocks: the field on the grid
    ``factor`` times coarser, in that grid's voxels (values divided by ``factor``)."""
    spatial = disp.shape[1:-1]
    if any(s % factor for s in spatial):
        raise ValueError(f"field size {spatial} is not divisible by {factor}")
    shape = [disp.shape[0]]
    for s in spatial:
        shape += [s // factor, factor]
    blocks = disp.reshape(*shape, disp.shape[-1])
    mean = blocks.mean(axis=tuple(2 + 2 * i for i in range(len(spatial))))
    return mean / factor


def ceiling_predictor(predict: Callable, factor: int) -> Callable:
    """``predict`` with its field averaged onto the grid ``factor`` times coarser and brought back by
    ``up(.)`` (:func:`crd_jax.ops.spatial.upsample_field`, as a low-resolution registrar's field is)."""
    coarse = jax.jit(lambda d: upsample_field(block_mean_field(d, factor), factor))

    def predict_ceiling(params, moving, fixed):
        return coarse(predict(params, moving, fixed))

    return predict_ceiling


def mean_dice(
    model: Model,
    params: Params,
    dataset: Dataset,
    pairs: Sequence[Tuple[int, int]],
    labels: Sequence[int],
    predict: Optional[Callable] = None,
) -> float:
    rows = evaluate_pairs(model, params, dataset, pairs, labels, predict=predict)
    return float(summarize(rows)["dice_mean"])


def ceiling(
    model: Model, params: Params, dataset: Dataset, pairs: Sequence[Tuple[int, int]], labels: Sequence[int], factor: int
) -> Dict[str, float]:
    """Dice of ``model`` itself and of its field averaged to the ``1/factor`` grid, on ``pairs``."""
    predict = predictor(model)
    rows = evaluate_pairs(model, params, dataset, pairs, labels, predict=ceiling_predictor(predict, factor))
    return {"ceiling_dice": float(summarize(rows)["dice_mean"]), "factor": int(factor), "pairs": len(pairs)}


def field_distance(
    teacher: Model,
    teacher_params: Params,
    student: Model,
    student_params: Params,
    dataset: Dataset,
    pairs: Sequence[Tuple[int, int]],
) -> float:
    """RMS over the canvas and the pairs of ``up(phi^T) - up(phi^S)``, in input (high-resolution) voxels."""
    t_predict, s_predict = predictor(teacher), predictor(student)
    total, count = 0.0, 0
    for mi, fi in pairs:
        m = jnp.asarray(dataset.image(mi))[None, ..., None]
        f = jnp.asarray(dataset.image(fi))[None, ..., None]
        diff = np.asarray(t_predict(teacher_params, m, f), np.float64) - np.asarray(s_predict(student_params, m, f), np.float64)
        total += float(np.sum(diff**2))
        count += diff[..., 0].size
    return float(np.sqrt(total / max(count, 1)))


TERM_WEIGHTS = ("loss_L", "deformation", "feature")


def term_gradient_norms(
    loss_fn: Callable, params: Params, frozen: Params, batches: Sequence[Dict], weights: Dict[str, float]
) -> Dict:
    """Per term of eq. 10 (the keys of the stage loss's ``aux`` named in ``weights``): the mean over
    ``batches`` of ``||d term / d params||`` (global 2-norm, unweighted) and the weight it enters with."""
    norms = {name: [] for name in weights}
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        for name in weights:
            g = jax.grad(lambda p: loss_fn(p, frozen, batch)[1][name])(params)
            norms[name].append(float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))))
    return {
        name: {
            "weight": float(weights[name]),
            "grad_norm": float(np.mean(v)),
            "weighted_grad_norm": float(weights[name]) * float(np.mean(v)),
        }
        for name, v in norms.items()
    }


def _cached(path, compute: Callable[[], Dict]) -> Dict:
    import json

    from crd_jax.training.pipeline import write_text  # here: pipeline imports this module

    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=1))
    return value


def distill_diagnostics(
    name: str,
    st: StageConfig,
    plan: StagePlan,
    done: Dict[str, Trained],
    datasets: Mapping[str, Dataset],
    labels: Sequence[int],
    loader: PairLoader,
    config: ml_collections.ConfigDict,
    workdir: Union[str, Path],
    eval_pairs_: Sequence[Tuple[int, int]],
) -> Dict:
    """Every diagnostic of this module for the finished distillation stage ``name`` (its plan, the finished
    stages ``done``), cached under ``workdir/diagnostics/`` (a teacher's ceiling and headroom Dice are
    computed once for every student it teaches). ``eval_pairs_``: the evaluation split's pairs."""
    from pathlib import Path

    workdir = Path(workdir)
    cache = workdir / "diagnostics"
    teacher, student = done[st.teacher], done[name]
    factor = int(student.spec["factor"])
    train, evaluation = datasets.get("train"), datasets.get(config.eval.split)
    out: Dict = {"stage": name, "teacher": st.teacher, "factor": factor}

    # term gradients at the start of S3: the stage's own first batches, its starting parameters
    def gradients():
        from crd_jax.training.stages import stage_loss_config

        loss_cfg = stage_loss_config(config, st)
        weights = {
            "loss_L": 1.0 if bool(loss_cfg.get("student_term", True)) else 0.0,
            "deformation": float(loss_cfg.alpha),
            "feature": float(loss_cfg.beta),
        }
        batches = [loader.batch(i) for i in range(GRADIENT_BATCHES)]
        return term_gradient_norms(plan.loss_fn, plan.init_params, plan.frozen, batches, weights)

    out["term_gradients_at_start"] = _cached(cache / f"{name}_gradients.json", gradients)

    if evaluation is not None and evaluation.has_labels:
        # the teacher's field and every high-resolution baseline's, averaged onto the student's grid
        sources = [st.teacher] + [s for s, t in done.items() if t.spec["kind"] == "registrar" and int(t.spec["factor"]) == 1]
        out["ceiling"] = {}
        for source in dict.fromkeys(sources):
            t = done[source]
            out["ceiling"][source] = _cached(
                cache / f"ceiling_{source}_n{factor}.json",
                lambda: ceiling(t.model, t.params, evaluation, eval_pairs_, labels, factor),
            )
    if train is not None and train.has_labels and len(train) >= 2:
        pairs = headroom_pairs(len(train))
        out["headroom_pairs"] = [[train.ids[m], train.ids[f]] for m, f in pairs]
        out["teacher_train_dice"] = _cached(
            cache / f"headroom_{st.teacher}.json",
            lambda: {"dice": mean_dice(teacher.model, teacher.params, train, pairs, labels)},
        )["dice"]
        init_params = plan.full_params(plan.init_params)
        start = _cached(
            cache / f"{name}_start.json",
            lambda: {
                "dice": mean_dice(plan.model, init_params, train, pairs, labels),
                "distance": field_distance(teacher.model, teacher.params, plan.model, init_params, train, pairs),
            },
        )
        end = _cached(
            cache / f"{name}_end.json",
            lambda: {
                "dice": mean_dice(student.model, student.params, train, pairs, labels),
                "distance": field_distance(teacher.model, teacher.params, student.model, student.params, train, pairs),
            },
        )
        out["student_train_dice_start"], out["student_train_dice_end"] = start["dice"], end["dice"]
        out["field_distance_start"], out["field_distance_end"] = start["distance"], end["distance"]
    return out


def diagnostics_markdown(rows: Sequence[Dict]) -> str:
    """The report's section: one line per distillation stage."""
    if not rows:
        return ""
    lines = [
        "",
        "#### Distillation diagnostics",
        "",
        "| Stage | Ceilings (val Dice, field averaged to the student grid) | Teacher / student Dice on training pairs "
        "(start -> end) | Field distance start -> end (voxels) | Gradient norms at start (weight x norm) |",
        "|---|---|---|---|---|",
    ]
    for d in rows:
        ceil = ", ".join(f"{k} {v['ceiling_dice']:.4f}" for k, v in d.get("ceiling", {}).items()) or "-"
        head = (
            f"{d['teacher_train_dice']:.4f} / {d['student_train_dice_start']:.4f} -> {d['student_train_dice_end']:.4f}"
            if "teacher_train_dice" in d
            else "-"
        )
        dist = f"{d['field_distance_start']:.3f} -> {d['field_distance_end']:.3f}" if "field_distance_start" in d else "-"
        grads = ", ".join(f"{k} {v['weight']:g} x {v['grad_norm']:.3g}" for k, v in d["term_gradients_at_start"].items())
        lines.append(f"| {d['stage']} | {ceil} | {head} | {dist} | {grads} |")
    return "\n".join(lines) + "\n"
