"""Compilation helpers."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import jax

# XLA's CPU backend spends ~0.5 s of LLVM optimisation on every threefry random draw (and ~2.5 s on a
# normal draw's erf_inv), so a network's parameter initialisation took ~18 s to compile on a 2-core
# machine. Code that runs once gains nothing from optimisation: compile it at level 0 (~2 s). The
# random bits are the same at every optimisation level.
_ONE_SHOT_OPTIONS = {"xla_backend_optimization_level": 0}

_state = threading.local()


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within the block, :func:`run_once` returns ``jax.ShapeDtypeStruct`` trees instead of computing.

    Parameter initialisation then costs a trace, not a compilation, so a whole multi-stage training plan
    (every model, every stage's initial parameters) can be built and its train steps checked with
    ``jax.eval_shape`` in seconds: a dry run of a config.
    """
    previous = getattr(_state, "abstract", False)
    _state.abstract = True
    try:
        yield
    finally:
        _state.abstract = previous


def run_once(fn: Callable, *args):
    """Compiles ``fn`` without backend optimisation and calls it on ``args`` (for init-like code)."""
    if getattr(_state, "abstract", False):
        return jax.eval_shape(fn, *args)
    jitted = jax.jit(fn)
    if jax.default_backend() != "cpu":
        return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=_ONE_SHOT_OPTIONS)(*args)
