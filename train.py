"""Trains the CRD scheme end to end: baselines, cooperative training, teacher, distillation.

    python train.py                                   # built-in synthetic data (configs/synthetic_vm.py)
    python train.py --config=configs/oasis_vm.py --config.data.root=/data/neurite-oasis --config.workdir=runs/oasis

Re-running the same command resumes where it stopped (also after Ctrl-C, which exits with status 130, or
SIGTERM, 143: the running train step ends first, one line is printed). A bad config, flag or data folder
prints one line and exits with status 2, leaving nothing on disk; so does a loss that becomes NaN/Inf
(naming the stage and the step).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = str(ROOT / "configs" / "synthetic_vm.py")


def _fail(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _leave(message: str, status: int) -> None:
    """One line and an immediate exit: after Ctrl-C or SIGTERM the interpreter's teardown (JAX's, Orbax's and
    tensorstore's threads) is skipped, where it could end in a segmentation fault. Logs are line-buffered
    and flushed; checkpoints are written synchronously, so nothing is lost."""
    import os

    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def precheck(argv) -> None:
    """Loads the config file and checks every ``--config.<field>`` override before absl does: ml_collections
    reports a missing file or an unknown field with tracebacks, at import time."""
    from crd_jax.cli.common import load_config as _load_config
    from crd_jax.config import check_override
    from crd_jax.errors import InputError

    path, overrides = DEFAULT_CONFIG, []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config.") :].split("=", 1)[0])
    try:
        config = _load_config(path)
        for dotted in overrides:
            check_override(config, dotted)
    except InputError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    from crd_jax.allocator import reexec_with_huge_page_malloc

    reexec_with_huge_page_malloc((__file__,))  # training: XLA's per-step buffers in 2 MB pages (crd_jax/allocator.py)
    sys.argv = [
        a.replace("--allow-config-change", "--allow_config_change", 1) if a.startswith("--allow-config-change") else a
        for a in sys.argv
    ]
    from crd_jax.cli.main import cap_thread_count

    cap_thread_count(prog="train.py")
    precheck(sys.argv)

flags.DEFINE_bool(
    "allow_config_change",
    False,
    "resume a workdir with a config changed where it was already trained "
    "(recorded in config_history.jsonl); also spelt --allow-config-change",
)
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Path to a config file under configs/.", lock_config=True)


def parse_flags(argv):
    """absl's parser, with its multi-line errors (a missing config file, an unknown field) cut to one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as exc:
        text = " ".join(str(exc).split())
        _fail(text.replace("flag --config=", "config ")[:400])
    except Exception as exc:  # a config file that raises while it loads
        _fail(f"the config does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
    import signal

    from crd_jax.errors import InputError
    from crd_jax.outputs import Terminated
    from crd_jax.training import pipeline
    from crd_jax.training.loop import DeadlineReached

    def terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)  # while a stage trains, the loop holds it until the step ends

    try:
        config = _CONFIG.value
    except Exception as exc:  # ml_collections defers some load errors to here
        _fail(f"the config does not load ({' '.join(str(exc).split())[:300]})")
    from crd_jax.user_cache import enable_compilation_cache

    # JAX's persistent compilation cache, as the command line uses it: a resumed run (after Ctrl-C, SIGKILL or a
    # deadline) and a rerun on the same shapes load their compiled train steps instead of compiling them again.
    # CRD_JAX_CACHE_DIR=off turns it off; a folder that is not private to this user is not used.
    enable_compilation_cache()
    try:
        pipeline.run(config, allow_config_change=flags.FLAGS.allow_config_change)
    except OSError as exc:  # the workdir's file system: full, read-only, another user's
        _fail(f"{exc.filename or config.workdir}: {exc.strerror or exc}")
    except InputError as exc:
        hint = (
            " (the built-in synthetic data needs no files: --config=configs/synthetic_vm.py)"
            if ("root" in str(exc) or "folder" in str(exc)) and "workdir" not in str(exc)
            else ""
        )
        _fail(f"{exc}{hint}")
    except KeyboardInterrupt:
        _leave("error: interrupted; re-run the same command to resume from the last checkpoint", 130)
    except Terminated:
        _leave("error: terminated (SIGTERM); the interrupted step was saved; re-run the same command to resume", 143)
    except DeadlineReached as exc:
        _leave(f"stopped: {exc} (config.train.deadline); re-run to resume", 75)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
