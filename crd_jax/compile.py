"""Compilation helpers."""

from __future__ import annotations

from typing import Callable

import jax

# XLA's CPU backend spends ~0.5 s of LLVM optimisation on every threefry random draw (and ~2.5 s on a
# normal draw's erf_inv), so a network's parameter initialisation took ~18 s to compile on a 2-core
# machine. Code that runs once gains nothing from optimisation: compile it at level 0 (~2 s). The
# random bits are the same at every optimisation level.
_ONE_SHOT_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once(fn: Callable, *args):
    """Compiles ``fn`` without backend optimisation and calls it on ``args`` (for init-like code)."""
    jitted = jax.jit(fn)
    if jax.default_backend() != "cpu":
        return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=_ONE_SHOT_OPTIONS)(*args)
