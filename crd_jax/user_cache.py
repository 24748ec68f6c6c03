"""The per-user cache folder of crd-jax (compiled programs, parameter shapes): ``$CRD_JAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/crd_jax`` or ``~/.cache/crd_jax``; ``CRD_JAX_CACHE_DIR=off`` disables caching.

The cache holds programs that are loaded and run, so it must be this user's alone: its folders are created
private (0700, whatever the umask); each part (``xla``, ``executables``, ...) must be a folder of this user
(made private again if an earlier release left it writable by others), and one owned by someone else, or
one that cannot be made private, turns that part off with one warning line. (The root may be a shared
folder: another user who can write there can only replace a part with a folder of their own, which is
refused.)
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Optional

_warned = set()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"crd-jax: warning: {message}", file=sys.stderr)


def private_folder(path: str) -> bool:
    """Creates ``path`` (0700) if need be and checks that it is a folder of this user that nobody else can
    write (made private if it is ours and was not). ``False``, with one warning line, when it cannot be used."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if st.st_uid != os.getuid():
        _warn(f"cache folder {path} belongs to another user (uid {st.st_uid}); caching is off")
        return False
    if st.st_mode & 0o077:
        try:  # ours, made with a permissive umask by an earlier release: make it private again
            os.chmod(path, 0o700)
        except OSError:
            _warn(f"cache folder {path} is writable by others and cannot be made private; caching is off")
            return False
    return True


def cache_folder(part: str) -> Optional[str]:
    """``<cache root>/<part>``, created private if need be; ``None`` when caching is off or the folder cannot
    be made or trusted (a cache only saves time: never a reason to fail)."""
    root = os.environ.get("CRD_JAX_CACHE_DIR", "")
    if root.lower() in ("off", "0", "none"):
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "crd_jax")
    path = os.path.join(root, part)
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return path if private_folder(path) else None


def trusted_file(fd: int) -> bool:
    """An open cache entry may be used: a regular file of this user that nobody else can write."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def enable_compilation_cache() -> Optional[str]:
    """JAX's persistent compilation cache in the user's cache folder (``xla``), so that a second ``crd-jax``
    call loads the compiled programs instead of compiling them again, and the registration path's whole
    programs (``executables``: loaded without tracing, :func:`crd_jax.compile.cache_executables`). Called by the
    command line and by batch workers (Dask), before their first compilation."""
    path = cache_folder("xla")
    if path is None:
        return None
    import jax

    from crd_jax.compile import cache_executables

    cache_executables(cache_folder("executables"))

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
