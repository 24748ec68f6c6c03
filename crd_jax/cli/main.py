"""``crd-jax``: register images with a trained model, evaluate it, draw figures, convert the authors' weights.

    crd-jax register --model lpba40-vm-ll-crd --fixed F.nii.gz --moving M.nii.gz --out-dir out
    crd-jax register --pairs pairs.csv --out-dir out          (pairs.csv: fixed,moving[,moving_seg[,name]] rows)
    crd-jax evaluate --model runs/oasis/stages/vm_l_crd/model --config configs/oasis_vm.py
    crd-jax figure --from out --out pair.png
    crd-jax convert-official --checkpoint student.pth --kind student --out models/crd_official_student
    crd-jax export --disp out/disp.nii.gz --fixed F.nii.gz --format itk --out-dir out

Bad input (an unreadable file, a wrong rank, NaN voxels, a checkpoint of the wrong kind, an output folder
that is a file) prints one line and exits with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import List, MutableMapping, Optional, Sequence

from crd_jax.cli import apply, build_kernel, convert_official, evaluate, export, figure, finetune, models, options, register
from crd_jax.errors import InputError
from crd_jax.user_cache import enable_compilation_cache

#: the subcommands, in the order ``crd-jax --help`` lists them; each module has ``add_parser(sub)`` and ``run(args)``
SUBCOMMANDS = (register, apply, models, finetune, evaluate, figure, convert_official, export, build_kernel)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors (an unknown option, a missing or malformed value) as the one line the contract promises,
    status 2; the usage block is what ``--help`` prints."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: the package, JAX and the convolution path this machine runs."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print versions and the convolution path, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import jax

        import crd_jax
        from crd_jax.ops import native

        conv = native.describe()
        bf16 = native.describe_bf16() or "unavailable on this CPU"
        print(
            f"crd-jax {crd_jax.__version__}, jax {jax.__version__} on {jax.default_backend()}; convolution: {conv}; "
            f"--bf16: {bf16}"
        )
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="crd-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    for command in sub.choices.values():  # -q, -v, --log FILE: shared by every subcommand
        options.add_logging(command)
    return p


MAX_THREADS_PER_CPU = 4  # CRD_JAX_NUM_THREADS above this many threads per CPU is capped


def cap_thread_count(environ: MutableMapping[str, str] = os.environ, prog: str = "crd-jax") -> Optional[int]:
    """``CRD_JAX_NUM_THREADS`` (the native kernel's thread pool) capped at ``MAX_THREADS_PER_CPU`` threads per
    CPU of the machine, with one warning line: 100,000 threads exhaust the system's thread limit (other
    processes then fail to start threads). Must run before the native kernel is loaded. Returns the cap applied."""
    value = environ.get("CRD_JAX_NUM_THREADS")
    if not value:
        return None
    cap = MAX_THREADS_PER_CPU * max(1, os.cpu_count() or 1)
    try:
        n = int(value)
    except ValueError:
        print(f"{prog}: warning: CRD_JAX_NUM_THREADS={value!r} is not a number; ignored", file=sys.stderr)
        del environ["CRD_JAX_NUM_THREADS"]
        return None
    if n > cap:
        print(f"{prog}: warning: CRD_JAX_NUM_THREADS={n} capped at {cap} ({MAX_THREADS_PER_CPU} per CPU)", file=sys.stderr)
        environ["CRD_JAX_NUM_THREADS"] = str(cap)
        return cap
    return None


def _raise_for_signal(signum, frame):
    """SIGINT and SIGTERM: recorded (an output set asks before it lands, in case a callback swallows the
    exception), then raised as ``KeyboardInterrupt`` / :class:`~crd_jax.outputs.Terminated`."""
    from crd_jax.outputs import note_signal, raise_for_signal

    note_signal(signum)
    raise_for_signal(signum)


def _signal_behind(exc: BaseException) -> Optional[BaseException]:
    """The ``KeyboardInterrupt`` or ``Terminated`` an exception was raised while handling (an interrupt during
    an extension module's initialisation surfaces as an ImportError), or None."""
    from crd_jax.outputs import Terminated

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Terminated)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    import logging

    logging.getLogger("nibabel").setLevel(
        logging.ERROR
    )  # its header fix-up notes ("vox offset ... too low") are not ours to print
    from crd_jax.outputs import Terminated, clear_noted_signals, noted_signal

    clear_noted_signals()
    previous = {}
    try:  # SIGTERM (a batch system's time limit, `kill`) ends the command like Ctrl-C: outputs cleaned, one line
        for sig in (signal.SIGINT, signal.SIGTERM):
            # an ignored SIGINT stays ignored (a background job of a shell, a test worker: Ctrl-C is its parent's)
            if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, _raise_for_signal)
    except ValueError:  # not the main thread
        pass
    swallowed = None
    try:
        options.configure_logging(args)
        if args.func not in (models.run, build_kernel.run):
            enable_compilation_cache()
        if getattr(args, "allow_backbone_module", None):  # a fork's backbone module, named by the user (model_io)
            from crd_jax import model_io

            model_io.allow_backbone_modules(args.allow_backbone_module)
        status = args.func(args)  # None (0), or a subcommand's own status (register --keep-going: 1)
    except InputError as exc:
        print(f"crd-jax: error: {exc}", file=sys.stderr)
        logging.getLogger("crd_jax").error("error: %s", exc, extra={"file_only": True})  # --log FILE: the same line
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        return _interrupted(exc)
    except Exception as exc:
        behind = _signal_behind(exc)
        if behind is None:
            raise
        return _interrupted(behind)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        swallowed = noted_signal()
        clear_noted_signals()  # this command's: later library calls in this process write as usual
    if swallowed is not None:  # an interrupt a callback swallowed: the command did not finish as asked
        return _interrupted(KeyboardInterrupt() if swallowed == signal.SIGINT else Terminated())
    return int(status or 0)


def _interrupted(exc: BaseException) -> int:
    from crd_jax.outputs import Terminated

    if isinstance(exc, Terminated):
        print("crd-jax: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    print("crd-jax: interrupted; nothing was written", file=sys.stderr)
    return 130


#: subcommands that train, and so run on in a process whose malloc asks for huge pages (crd_jax/allocator.py);
#: not ``register``: its blocks are freed and mapped again at other sizes, and there the advice measured slower
TRAINING_SUBCOMMANDS = ("finetune",)


def subcommand(argv: Sequence[str]) -> Optional[str]:
    """The subcommand's name in a ``crd-jax`` command line (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def entry() -> None:
    from crd_jax.allocator import reexec_with_huge_page_malloc, return_large_blocks_to_the_system

    if subcommand(sys.argv[1:]) in TRAINING_SUBCOMMANDS:  # the console script, or python -m crd_jax
        reexec_with_huge_page_malloc(("crd-jax", str(Path(__file__).resolve().parents[1] / "__main__.py")))
    cap_thread_count()
    return_large_blocks_to_the_system()
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if status in (130, 143):
        # interrupted or terminated while XLA's threads may still hold work: the interpreter's teardown could
        # then end in a segmentation fault (seen after Ctrl-C during --io-steps); our files are settled (the
        # output set removed its staging folder), so leave at once with the status
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
