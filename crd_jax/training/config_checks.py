"""Values of a training config checked when a run starts, before anything is read or written: a value that
would only fail after a stage has trained (or train into NaN parameters with exit 0, as ``lr=nan`` did)
is one line naming the field, exit 2."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, List, Sized, Tuple

from crd_jax.errors import InputError

if TYPE_CHECKING:
    import ml_collections


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if node is None or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _real(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> Callable[[Any], str]:
    def check(v) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            return f"must be a finite number, got {v!r}"
        v = float(v)
        if v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi):
            return f"must be in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}, got {v!r}"
        return ""

    return check


def _integer(lo: int, hi: int = 10**12) -> Callable[[Any], str]:
    def check(v) -> str:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        if not lo <= v <= hi:
            return f"must be an integer in [{lo}, {hi}], got {v}"
        return ""

    return check


def _shape(lo: int, hi: int, allow_empty: bool) -> Callable[[Any], str]:
    def check(v) -> str:
        try:
            items = list(v)
        except TypeError:
            return f"must be a tuple of integers, got {v!r}"
        if not items:
            return "" if allow_empty else "must not be empty"
        if len(items) not in (2, 3):
            return f"must have 2 or 3 sides, got {tuple(items)}"
        for x in items:
            if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
                return f"sides must be integers in [{lo}, {hi}], got {tuple(items)}"
        return ""

    return check


def _boolean(v) -> str:
    return "" if isinstance(v, bool) else f"must be True or False, got {v!r}"


def _percentiles(v) -> str:
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        return f"must be (low, high), got {v!r}"
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 100):
        return f"must be 0 <= low < high <= 100, got {v!r}"
    return ""


def _similarity(v) -> str:
    from crd_jax.losses import SIMILARITIES  # registered by crd-jax and by any module the config imported

    if not isinstance(v, str) or v not in SIMILARITIES:
        return f"unknown similarity {v!r} (registered: {', '.join(sorted(SIMILARITIES))})"
    return ""


def _fractions(v) -> str:
    try:
        items = [float(x) for x in v]
    except (TypeError, ValueError):
        return f"must be fractions of the stage's steps, got {v!r}"
    if not all(math.isfinite(x) and 0 <= x <= 1 for x in items):
        return f"must be fractions in [0, 1], got {v!r}"
    return ""


CHECKS: List[Tuple[str, Callable[[Any], str]]] = [
    ("seed", _integer(-(2**63), 2**63 - 1)),
    ("train.lr", _real(0.0, 10.0, open_lo=True)),
    ("train.b1", _real(0.0, 1.0, open_hi=True)),
    ("train.b2", _real(0.0, 1.0, open_hi=True)),
    ("train.lr_decay_at", _fractions),
    ("train.lr_decay_factor", _real(0.0, 10.0, open_lo=True)),
    ("train.grad_clip", _real(0.0, 1e12)),
    ("train.log_every", _integer(1)),
    ("train.checkpoint_every", _integer(1)),
    ("train.keep_checkpoints", _integer(1, 10**6)),
    ("train.eval_every", _integer(-(10**12))),
    ("train.max_steps", _integer(-(10**12))),
    ("train.teacher_cache_gb", _real(0.0, 1e6)),
    ("train.teacher_cache_disk_gb", _real(0.0, 1e9)),
    ("train.bf16", _boolean),
    ("loss.reg_weight", _real(0.0, 1e6)),
    ("loss.ncc_window", _integer(1, 99)),
    ("loss.similarity", _similarity),
    ("loss.label_weight", _real(0.0, 1e6)),
    ("loss.alpha", _real(0.0, 1e6)),
    ("loss.beta", _real(0.0, 1e6)),
    ("model.shift", _integer(0, 4)),
    ("model.int_steps", _integer(0, 30)),
    ("model.negative_slope", _real(0.0, 1.0)),
    ("data.ndim", _integer(2, 3)),
    ("data.percentiles", _percentiles),
    ("data.resample_shape", _shape(8, 1024, allow_empty=True)),
    ("data.shape", _shape(8, 1024, allow_empty=True)),
    ("data.cache_size", _integer(0)),
    ("data.prefetch", _integer(0, 1024)),
    ("data.synthetic.shape", _shape(8, 512, allow_empty=False)),
    ("data.synthetic.train", _integer(2, 10**6)),
    ("data.synthetic.num_labels", _integer(1, 10**4)),
    ("data.synthetic.max_displacement", _real(0.0, 1e3)),
    ("eval.timing_repeats", _integer(1, 10**6)),
    ("eval.val_pairs", _integer(0)),
]


def check_values(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`InputError` (``config.<field>``) for the first value out of its range."""
    for dotted, check in CHECKS:
        if dotted.startswith("data.synthetic.") and _get(config, "data.kind") != "synthetic":
            continue
        value = _get(config, dotted)
        if value is _MISSING:
            continue
        problem = check(value)
        if problem:
            raise InputError(f"config.{dotted}", problem)
    stages = _get(config, "stages")
    for name in stages if stages is not _MISSING and stages is not None else {}:
        own = _get(config, f"stages.{name}.loss.similarity")
        problem = _similarity(own) if own is not _MISSING else ""
        if problem:
            raise InputError(f"config.stages.{name}.loss.similarity", problem)


def check_bf16_training(config: ml_collections.ConfigDict) -> None:
    """``train.bf16 = True`` needs the native CPU kernel on a CPU with AVX512-BF16 or AMX (it runs the bfloat16
    convolutions): elsewhere (a GPU, another CPU, the kernel off) the run is refused with one line rather than
    silently trained in float32 under a bfloat16 label."""
    if _get(config, "train.bf16") is not True:
        return
    import jax

    from crd_jax.ops import native

    backend = jax.default_backend()
    if backend != "cpu":
        problem = f"bfloat16 training runs on the native CPU kernel; this run's devices are {backend}"
    elif not native.available():
        problem = "bfloat16 training needs the native CPU kernel, which is not available here (crd-jax build-kernel)"
    elif not native.has_bf16():
        problem = "bfloat16 training needs a CPU with AVX512-BF16 or AMX; this CPU has neither"
    else:
        return
    raise InputError("config.train.bf16", problem + ": leave train.bf16 False (float32 training)")


def check_training_split(train_ds: Sized) -> None:
    """Training needs pairs: at least two subjects."""
    n = len(train_ds)
    if n < 2:
        raise InputError(
            "config.data.splits.train", f"the training split holds {n} subject(s); at least 2 are needed to form pairs"
        )
