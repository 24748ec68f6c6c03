"""What the commands ask of glibc's allocator: that a process which allocates and frees full-size volumes in
turn stays small (``register``), and that the large blocks XLA allocates afresh on every call are backed by
transparent huge pages (training). Standard library only: the command line (:func:`crd_jax.cli.main.entry`)
and ``train.py`` call it before any heavy import."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Mapping, MutableMapping, Optional, Sequence, Tuple

#: the glibc tunable (glibc >= 2.35) under which malloc advises ``MADV_HUGEPAGE`` on the memory it maps
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def _glibc():
    """glibc with ``malloc_trim`` and ``mallopt``, or None (another C library, another system)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (both exist, or this is not glibc)
        return libc
    except (OSError, AttributeError):
        return None


def return_large_blocks_to_the_system(threshold: int = 16 << 20) -> None:
    """Makes glibc's malloc map every block of ``threshold`` bytes or more on its own (``M_MMAP_THRESHOLD``),
    so freeing it returns its pages at once. By default glibc raises that threshold after the first large
    free, up to 32 MB, and the full-size volumes and fields that ``register`` allocates and frees in turn then
    stay in the heap and add up. 16 MB: at OASIS size ~40 MB less peak RSS within the time noise (1 MB saved
    ~65 MB but cost ~0.1 s in page faults). For the command's own process only (a library does not change
    its host's allocator); elsewhere a no-op."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def release_free_memory() -> None:
    """Hands memory that glibc's allocator holds free back to the system (``malloc_trim``). Between pairs
    the writer's and XLA's threads leave freed blocks in their own arenas, and the process grew by ~70 MB a
    pair without this; after the inputs are resampled, the full-size copies' blocks would otherwise stay
    in the process until it exits. Elsewhere (not glibc) it does nothing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def glibc_version() -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of the C library this process runs on when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc, not POSIX
        return None


def thp_mode(path: str = THP_SETTING) -> Optional[str]:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``: the bracketed word of
    ``path``), or None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_page_tunables(environ: Mapping[str, str], glibc: Optional[Tuple[int, int]], thp: Optional[str]) -> Optional[str]:
    """The ``GLIBC_TUNABLES`` value under which malloc asks for transparent huge pages, or None where there is
    nothing to change.

    Why: XLA's CPU runtime allocates each call's temporary buffer (over 100 MB for a 128^3 VM-L train step) with
    malloc, which maps a block that large afresh and unmaps it on free; every call then faults it in again, 4 KB
    at a time. glibc's ``hugetlb`` tunable makes malloc advise ``MADV_HUGEPAGE`` on what it maps, so the kernel
    fills it in 2 MB pages (faults, system seconds and steps: benchmarks/huge_page_malloc.py). Tunables are read
    when a process starts, hence a value for a re-executed process.

    None when: ``CRD_JAX_HUGEPAGES=0``; not glibc >= 2.35 (where the tunable exists); the kernel's mode is not
    ``madvise`` (``always`` already backs such mappings with huge pages, ``never`` refuses them); or
    ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` (the user's choice, and what stops a second exec).
    """
    if environ.get("CRD_JAX_HUGEPAGES", "1").strip() == "0":
        return None
    if glibc is None or glibc < (2, 35) or thp != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    return f"{current}:{HUGE_PAGE_TUNABLE}" if current else HUGE_PAGE_TUNABLE


def wanted_tunables(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """:func:`huge_page_tunables` on this machine: what a training command re-executes itself with, or None."""
    return huge_page_tunables(environ, glibc_version(), thp_mode())


#: set in the re-executed process's environment to its pid: at most one exec per process, even where the loader
#: strips ``GLIBC_TUNABLES`` (secure execution: setuid or file capabilities), which would otherwise loop
REEXEC_MARK = "CRD_JAX_MALLOC_REEXEC"


def started_as(entry_points: Sequence[str], argv: Sequence[str], orig_argv: Sequence[str]) -> bool:
    """Whether the interpreter's own command line (``orig_argv``) is this command's (``argv``, ``sys.argv``): it
    ends with ``argv[1:]``, starts the script ``argv[0]`` (or a ``-m`` module), and that is one of
    ``entry_points`` (a path, compared resolved, or a bare name, compared with ``argv[0]``'s last part). False
    for code run inside another program (``runpy``, a notebook, a wrapper that sets ``sys.argv``), which an exec
    would restart from its beginning."""
    pos = len(orig_argv) - len(argv)
    if not argv or pos < 1 or list(orig_argv[pos + 1 :]) != list(argv[1:]):
        return False
    if orig_argv[pos] != argv[0] and orig_argv[pos - 1] != "-m":
        return False
    here = Path(argv[0])
    return any((here.name == e) if os.sep not in e else here.resolve() == Path(e).resolve() for e in entry_points)


def reexec_with_huge_page_malloc(entry_points: Sequence[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Runs this command again, in the same process (``execve``: same pid, interpreter options, arguments and
    standard streams), with :func:`huge_page_tunables`' value in ``GLIBC_TUNABLES`` (which child processes
    inherit). Returns without doing anything where that value is None; where this process was exec'd for it
    already (:data:`REEXEC_MARK`); where the command is not what started the interpreter (:func:`started_as`
    with ``entry_points``: the command's script path or console-script name); under a debugger or tracer
    (``sys.gettrace()``: a restart would drop its session); or for a script read from standard input. Call it
    first thing in a command's entry point, before threads start or output is written. For commands only: a
    library does not re-execute its host."""
    value = wanted_tunables(environ)
    argv, orig_argv = list(sys.argv), list(getattr(sys, "orig_argv", []) or [])
    if value is None or environ.get(REEXEC_MARK) == str(os.getpid()) or sys.gettrace() is not None:
        return
    if not sys.executable or argv[:1] in (["-"], [""]) or not started_as(entry_points, argv, orig_argv):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, orig_argv, {**environ, "GLIBC_TUNABLES": value, REEXEC_MARK: str(os.getpid())})
    except OSError:  # the interpreter cannot be executed again (removed, a sandbox): run on as it is
        return


def training_runs_in_huge_pages(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a training command started from ``environ`` runs with malloc in huge pages: it re-executes itself
    with the tunable on this machine, or ``environ`` sets it already."""
    return wanted_tunables(environ) is not None or bool(huge_page_malloc_note(environ))


def huge_page_malloc_note(environ: Mapping[str, str] = os.environ) -> str:
    """A few words for a training log when this process's malloc advises huge pages, else ``""``."""
    if HUGE_PAGE_TUNABLE not in environ.get("GLIBC_TUNABLES", "").split(":"):
        return ""
    return f"malloc in transparent huge pages ({HUGE_PAGE_TUNABLE}; CRD_JAX_HUGEPAGES=0 turns it off)"
