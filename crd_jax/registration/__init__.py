"""Registering a volume: everything between two image files and the files a registration writes.

==========================  ==========================================================================
:mod:`.model`               a model folder loaded and checked; its canvas multiple; its one compiled
                            predictor; per-pair instance optimisation
:mod:`.space`               the model's space: orientation, voxel size, the one resampler onto its grid
:mod:`.checks`              what is refused before computing, and the not-pre-aligned warning
:mod:`.pipeline`            prepare -> predict -> map back -> warp (:func:`register_volumes`), on the device
:mod:`.warping`             the field applied: images, label maps, folds, det J
:mod:`.writing`             the output set, its formats and ``registration.json``
==========================  ==========================================================================

``crd_jax.api``, the ``crd-jax`` command line, the evaluator and the benchmarks call this package; it imports
nothing of the command line. Importing the package is cheap: its modules load on first use.
"""

from __future__ import annotations

import importlib

#: ``register --normalize``: the model's own normalisation, none, min-max or percentiles (here, not in
#: :mod:`.pipeline`, so that the command line's option parser does not load JAX to list them)
NORMALIZE_CHOICES = ("model", "none", "minmax", "percentile")

_NAMES = {
    "LoadedModel": "model",
    "load": "model",
    "register_volumes": "pipeline",
    "load_pair": "pipeline",
    "OutputOptions": "writing",
    "write_registration": "writing",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
