"""Trains the CRD scheme end to end: baselines, cooperative training, teacher, distillation.

    python train.py                                   # built-in synthetic data (configs/synthetic_vm.py)
    python train.py --config=configs/oasis_vm.py --config.data.root=/data/neurite-oasis --config.workdir=runs/oasis

Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, logging
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "synthetic_vm.py"), "Path to a config file under configs/.", lock_config=True
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
    from crd_jax.errors import InputError
    from crd_jax.training import pipeline

    try:
        pipeline.run(_CONFIG.value)
    except InputError as exc:
        hint = " (the built-in synthetic data needs no files: --config=configs/synthetic_vm.py)" if "root" in str(exc) or "folder" in str(exc) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
