"""Evaluation: registration accuracy on labelled pairs, and inference latency and memory (Section IV-C).

Per pair: Dice per label and mean (over the protocol's structures), HD95 (optional, slow), Folds (det J <= 0),
% folds and SDlogJ of the displacement on the original grid. Per model: the median inference latency over
repeated runs after a warm-up (compile time reported apart) and XLA's compiled memory footprint
(arguments + outputs + temporaries: what the device must hold, the analogue of the paper's
``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax import metrics
from crd_jax.registration import model as registration_model
from crd_jax.registration.warping import warp_labels

if TYPE_CHECKING:
    from crd_jax.typing import Dataset, Model, Params


def predictor(model: Model) -> Callable:
    """The model's jitted ``(params, moving, fixed) -> disp`` (:func:`crd_jax.registration.model.predictor`)."""
    return registration_model.predictor(model)


def evaluate_pairs(
    model: Model,
    params: Params,
    dataset: Dataset,
    pairs: Sequence[Tuple[int, int]],
    labels: Sequence[int],
    hd95: bool = False,
    predict: Optional[Callable] = None,
) -> List[Dict]:
    """Metrics for each (moving, fixed) pair of ``dataset`` (which must have label maps)."""
    predict = predict or predictor(model)
    placement = dataset.placement
    spacing = None
    rows = []
    for mi, fi in pairs:
        m = jnp.asarray(dataset.image(mi))[None, ..., None]
        f = jnp.asarray(dataset.image(fi))[None, ..., None]
        disp = predict(params, m, f)
        seg_m = jnp.asarray(dataset.labels(mi))[None, ..., None]
        warped = warp_labels(dataset.labels(mi), np.asarray(disp[0]))
        seg_f = dataset.labels(fi)
        disp_src = placement.restore(np.asarray(disp[0]))
        warped_src = placement.restore(warped, fill=0)
        fixed_src = placement.restore(seg_f, fill=0)
        dice = metrics.dice(warped_src, fixed_src, labels)
        row = {
            "moving": dataset.ids[mi],
            "fixed": dataset.ids[fi],
            "dice": float(np.nanmean(dice)),
            "dice_per_label": [None if np.isnan(d) else float(d) for d in dice],
            "folds": metrics.count_folds(disp_src),
            "percent_folds": metrics.percent_folds(disp_src),
            "sdlogj": metrics.sdlogj(disp_src),
            "dice_before": float(
                np.nanmean(metrics.dice(placement.restore(np.asarray(seg_m[0, ..., 0]), fill=0), fixed_src, labels))
            ),
        }
        if hd95:
            if spacing is None:
                spacing = dataset.volume(fi).spacing
            row["hd95"] = float(np.nanmean(metrics.hd95(warped_src, fixed_src, labels, spacing)))
        rows.append(row)
    return rows


def summarize(rows: List[Dict]) -> Dict[str, float]:
    """Mean and standard deviation over pairs of every scalar metric."""
    out = {"num_pairs": len(rows)}
    if not rows:
        return out
    for key in ("dice", "dice_before", "folds", "percent_folds", "sdlogj", "hd95"):
        if key in rows[0]:
            values = np.asarray([r[key] for r in rows], np.float64)
            out[f"{key}_mean"] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values))
    return out


def measure_inference(model: Model, params: Params, shape: Sequence[int], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Latency (median, min, max over ``repeats`` runs after ``warmup``), compile time, XLA memory (MB)."""
    x = jnp.zeros((1, *shape, 1), jnp.float32)
    fn = registration_model.predictor(model)  # the model's one jitted predictor, compiled here for its memory analysis
    t0 = time.perf_counter()
    compiled = fn.lower(params, x, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, x, x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, x, x))
        times.append(time.perf_counter() - t)
    out = {
        "latency_s": float(np.median(times)),
        "latency_min_s": float(np.min(times)),
        "latency_max_s": float(np.max(times)),
        "compile_s": compile_s,
    }
    if mem is not None:
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        out.update(
            memory_mb=total / 2**20,
            memory_arguments_mb=mem.argument_size_in_bytes / 2**20,
            memory_outputs_mb=mem.output_size_in_bytes / 2**20,
            memory_temporaries_mb=mem.temp_size_in_bytes / 2**20,
        )
    return out


def count_parameters(params: Params) -> int:
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
