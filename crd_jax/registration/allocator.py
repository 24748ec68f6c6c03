"""What the command line asks of glibc's allocator, so that a process that allocates and frees full-size
volumes in turn stays small. Standard library only: the command line (:func:`crd_jax.cli.main.entry`) calls it before any heavy
import."""

from __future__ import annotations

import ctypes
import functools


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
