"""Option groups that several subcommands share, defined once: the model, the output folder and
``--overwrite``, the registration options (normalisation, quality, affine, instance optimisation, ``--bf16``)
and the Learn2Reg pair ids; and what they become (:func:`registration_kwargs`)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import TYPE_CHECKING, Iterable, Optional, TextIO, Tuple, Union

from crd_jax.errors import InputError
from crd_jax.registration import NORMALIZE_CHOICES

if TYPE_CHECKING:
    from pathlib import Path

MODEL_HELP = (
    "a shipped model's name (`crd-jax models`) or a model folder (default: lpba40-vm-ll-crd, the distilled "
    "VM-LL student: the fastest shipped model, not the most accurate)"
)

# What the presets cost: benchmarks/register_options.py on LPBA40 S35-S40 at 1 mm, AMD EPYC, 2 cores; the seconds
# from its last run on a quiet machine (--affine 2.5 s, --affine --io-steps 50 3.8 s per pair, 30 pairs), the
# Dice gain from benchmarks/results/register_options.json (accurate - fast; tests/test_first_hour.py checks it)
PRESET_COST = "fast about 2.5 s per pair, accurate about 4 s, for about +0.05 Dice"

# --bf16 doubles the multiply-adds per instruction; where the CPU issues those instructions at less than this
# fraction of that gain (Intel Sapphire Rapids without its AMX tiles: ~0.5x float32's rate, measured) the log
# says it will not pay.
BF16_WORTHWHILE = 1.2

PAIR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", help=help)
    add_allow_backbone_module(p)


def add_allow_backbone_module(p: argparse.ArgumentParser) -> None:
    """``--allow-backbone-module`` (every command that loads a model; :mod:`crd_jax.model_io`)."""
    p.add_argument(
        "--allow-backbone-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE where the model's model.json names it as the source of its backbone (a fork's; "
        "importing runs its code: only modules you trust). Repeatable; also CRD_JAX_BACKBONE_MODULES",
    )


def add_out_dir(p: argparse.ArgumentParser, help: str, default: Optional[str] = None) -> None:
    """``--out-dir`` (required unless it has a default) and ``--overwrite``."""
    p.add_argument("--out-dir", required=default is None, default=default, help=help)
    add_overwrite(p, "replace output files that exist already")


def add_overwrite(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_pair_ids(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair-ids", nargs=2, metavar=("FIXED_ID", "MOVING_ID"), help="ids in Learn2Reg file names")


def pair_ids(args: argparse.Namespace) -> Optional[Tuple[str, str]]:
    """``--pair-ids`` checked: each id becomes part of a file name, so it must be a plain name (letters, digits,
    '.', '_', '-'; no '/', no '..'), never a path that leads out of the output folder."""
    if not args.pair_ids:
        return None
    for value in args.pair_ids:
        if not PAIR_ID.match(value) or ".." in value:
            raise InputError(
                "--pair-ids",
                f"{value!r} is not a plain id (letters, digits, '.', '_', '-'; at most 64, no '/' or '..'); nothing was written",
            )
    return tuple(args.pair_ids)


def add_registration_options(p: argparse.ArgumentParser) -> None:
    """The options that change how a pair is registered (``register``, ``evaluate`` and ``figure`` share them)."""
    g = p.add_argument_group("registration options")
    g.add_argument(
        "--normalize",
        choices=NORMALIZE_CHOICES,
        default="model",
        help="intensity normalisation of the inputs (default: as the model was trained)",
    )
    g.add_argument(
        "--quality",
        choices=("fast", "accurate"),
        default="fast",
        help="fast (default): affine pre-alignment + the model's field; accurate: also --io-steps 50 "
        "(LPBA40 at 1 mm, 2 CPU cores: " + PRESET_COST + "; docs/cli.md has the table)",
    )
    g.add_argument(
        "--io-steps",
        type=int,
        default=None,
        help="instance optimisation: fine-tune the predicted field on this pair for N Adam steps at the model's "
        "own resolution (NCC + smoothness; uniGradICON uses 50). Default: 0, or 50 with --quality accurate",
    )
    g.add_argument(
        "--affine",
        nargs="?",
        const="ncc",
        choices=("ncc", "mi"),
        default=None,
        help="affine pre-alignment before the deformable model (intensity-based, coarse to fine, optax), on by "
        "default: ncc (default) or mi for multi-modal pairs; register writes affine.txt (RAS) and affine_itk.txt (ITK)",
    )
    g.add_argument(
        "--no-affine",
        action="store_true",
        help="skip the affine pre-alignment (for pairs already affinely aligned; a one-line warning when the "
        "images' centroids are far apart)",
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="the network's convolutions with bfloat16 inputs and weights (float32 sums) on CPUs with "
        "AVX512-BF16: faster, fields within ~0.1 voxel of float32 (see the README); elsewhere float32",
    )


def resolve_registration_options(args: argparse.Namespace) -> None:
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


def registration_kwargs(args: argparse.Namespace) -> dict:
    """``register_volumes`` keywords from the options of :func:`add_registration_options` (``--bf16`` is set
    for the process here, before anything is traced)."""
    resolve_registration_options(args)
    if args.io_steps < 0:
        raise InputError("--io-steps", f"must be 0 or more, got {args.io_steps}")
    if getattr(args, "bf16", False):
        from crd_jax.ops.conv import bf16_inference

        bf16_inference(True)
    return {
        "normalize_mode": args.normalize,
        "io_steps": args.io_steps,
        "affine": "ncc" if args.affine == "ncc" else ("nmi" if args.affine else ""),
    }


def conv_path(args: argparse.Namespace) -> str:
    """The convolution path for the log, with what ``--bf16`` did."""
    from crd_jax.ops import native

    path = native.describe()
    if getattr(args, "bf16", False):
        path += (
            f", bfloat16 inputs and weights (--bf16, {native.bf16_engine()})"
            if native.has_bf16()
            else ("; --bf16 ignored: needs the native kernel on a CPU with AVX512-BF16, float32 used")
        )
        speedup = native.bf16_speedup()
        if 0 < speedup < BF16_WORTHWHILE:
            path += (
                f"; this CPU's bfloat16 dot products run at {speedup:.2f}x its float32 multiply-add rate, "
                "so --bf16 is unlikely to be faster here (float32 is exact)"
            )
    return path


def model_path(model: Optional[str]) -> Path:
    """``--model``: a shipped model's folder by name, or the folder given (the default model when empty)."""
    from crd_jax import pretrained

    return pretrained.resolve(model)


def subcommand(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str,
    examples: Union[str, Iterable[str]],
    raw: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand's parser with its examples as the epilog (one ``example:`` line each)."""
    examples = [examples] if isinstance(examples, str) else list(examples)
    epilog = "\n".join(f"example: {e}" for e in examples)
    kwargs = {"formatter_class": argparse.RawDescriptionHelpFormatter} if raw or len(examples) > 1 else {}
    return sub.add_parser(name, help=help, description=description, epilog=epilog, **kwargs)


# --- logging: -q, -v, --log FILE for every subcommand ------------------------------------------------------------


def add_logging(p: argparse.ArgumentParser) -> None:
    """``-q``, ``-v`` and ``--log FILE`` (the command line adds them to every subcommand)."""
    g = p.add_argument_group("log")
    level = g.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", action="store_true", help="print errors only on stderr (no steps, no warnings)")
    level.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print debug detail on stderr (each step's start and end, each pair's steps with --pairs)",
    )
    g.add_argument(
        "--log",
        metavar="FILE",
        help="also append the log to FILE (each step with its time, at INFO, or DEBUG with -v), with timestamps",
    )


class _AboveProgressBars(logging.Handler):
    """Log records on stderr written with ``tqdm.write``, so that a line never lands on a progress bar."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def emit(self, record):
        if getattr(record, "file_only", False):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def log_level(args: argparse.Namespace, stream: Optional[TextIO] = None) -> int:
    """stderr's level: ``-q`` errors, ``-v`` debug; by default each step (INFO) on a terminal, warnings and
    errors only when stderr is a file or a pipe (a batch log: bad input then stays one line)."""
    stream = stream or sys.stderr
    if getattr(args, "quiet", False):
        return logging.ERROR
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return logging.INFO if getattr(stream, "isatty", lambda: False)() else logging.WARNING


def configure_logging(args: argparse.Namespace, stream: Optional[TextIO] = None) -> logging.Logger:
    """The ``crd_jax`` logger's handlers for this command (replacing an earlier command's in this process):
    stderr at :func:`log_level`, and ``--log FILE`` (appended; INFO, or DEBUG with ``-v``)."""
    stream = stream or sys.stderr
    root = logging.getLogger("crd_jax")
    for handler in [h for h in root.handlers if getattr(h, "_crd_jax_cli", False)]:
        root.removeHandler(handler)
        handler.close()
    console = _AboveProgressBars(stream)
    console.setLevel(log_level(args, stream))
    console.setFormatter(logging.Formatter("crd-jax: %(message)s"))
    handlers = [console]

    def install(handler):
        handler._crd_jax_cli = True
        root.addHandler(handler)
        root.setLevel(min(h.level for h in handlers))

    # the console first: an unwritable --log is then reported once, by the command line, not also by Python's
    # fallback handler (a logger without handlers prints its records to stderr)
    install(console)
    root.propagate = False
    if getattr(args, "log", None):
        try:
            to_file = logging.FileHandler(args.log, mode="a", encoding="utf-8")
        except OSError as exc:
            raise InputError(args.log, f"cannot write the log file ({exc.strerror or exc})") from None
        to_file.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
        install(to_file)
    logging.getLogger("crd_jax.registration.steps").setLevel(logging.NOTSET)  # --pairs lowers it; a new command resets
    return root
