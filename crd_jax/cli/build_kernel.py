"""``crd-jax build-kernel``: rebuilds the native CPU kernel explicitly (after a jaxlib upgrade, say), so that
nothing has to compile inside a user's process (:func:`crd_jax.ops.native_build.rebuild`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crd_jax.cli import options
from crd_jax.errors import InputError

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = options.subcommand(
        sub,
        "build-kernel",
        "rebuild the native CPU kernel for the installed jaxlib",
        "Compiles the native convolution and warp kernel against the installed jaxlib's FFI headers (needs a C++ "
        "compiler) and installs it where crd-jax loads it from. Without --force it rebuilds only when the kernel is "
        "missing or stale.",
        ["crd-jax build-kernel", "crd-jax build-kernel --force"],
        raw=True,
    )
    b.add_argument("--force", action="store_true", help="rebuild even when the installed kernel is current")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from crd_jax.ops import native_build  # here: the build tools load only for this command

    try:
        print(native_build.rebuild(force=bool(args.force)))
    except (OSError, RuntimeError) as exc:  # no compiler, a failed compilation: one line, not a traceback
        raise InputError("build-kernel", f"the kernel did not build ({' '.join(str(exc).split())[:300]})") from None
