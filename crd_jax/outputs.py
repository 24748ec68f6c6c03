"""Writing a command's outputs safely: all at once or not at all, never over what crd-jax did not write.

:class:`OutputSet` is how every command writes its files:

* before any computation it checks that the destination can be written (not a file, not a symlink loop,
  an existing ancestor that accepts a new entry) and that none of the files it will write exists already,
  unless ``overwrite`` is given; both failures are one-line :class:`InputError`\\ s;
* the files are written into a staging folder beside the destination (same file system), and only when
  the block finishes without error are they moved into place: the whole staging folder renamed onto a new
  destination, or each file renamed into an existing one while holding a lock on the parent folder, with
  SIGINT deferred so that Ctrl-C cannot cut the set in half;
* on any error (or Ctrl-C) the staging folder and any folder the set created are removed: the file system
  is left exactly as it was.

Files and folders get the permissions the user's umask gives (``tempfile`` creates 0600/0700).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from crd_jax.errors import InputError

_UMASK: Optional[int] = None


def umask() -> int:
    """The process's umask (read once: ``os.umask`` can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        current = os.umask(0o022)
        os.umask(current)
        _UMASK = current
    return _UMASK


def share_file(path) -> None:
    """Gives a file created by ``tempfile`` (0600) the mode a plain ``open`` would have (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~umask())


def share_tree(path) -> None:
    """Folders 0777 & ~umask and files 0666 & ~umask under ``path`` (all created by us)."""
    path = Path(path)
    os.chmod(path, 0o777 & ~umask())
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask())
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask())


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable_folder(folder, what: str = "output folder") -> Path:
    """The checks an output folder must pass before anything is computed; returns it as an absolute path."""
    folder = Path(os.path.abspath(folder))
    if folder.is_symlink():
        try:
            os.stat(folder)
        except OSError as exc:
            problem = "a symlink loop" if exc.errno == errno.ELOOP else "a broken symlink"
            raise InputError(folder, f"{what} is {problem}") from None
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, f"{what} is a file")
    anchor = _existing_ancestor(folder)
    if not anchor.is_dir():
        raise InputError(folder, f"{what} cannot be created: {anchor} is a file")
    try:  # a real probe: permissions, read-only mounts, quotas (os.access is wrong for root)
        fd, probe = tempfile.mkstemp(prefix=".crd-jax-probe.", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(folder, f"{what} is not writable ({exc.strerror} in {anchor})") from None
    return folder


@contextlib.contextmanager
def _deferred_sigint():
    """Holds SIGINT back while a set of renames runs (main thread only)."""
    pending = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _locked(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class OutputSet:
    """``with OutputSet(folder, names, overwrite) as stage: write stage / name ...``.

    ``names``: every file the block will write (relative to ``folder``); writing anything else is an error.
    """

    def __init__(self, folder, names: Iterable[str], overwrite: bool = False, what: str = "output folder"):
        self.folder = check_writable_folder(folder, what)
        self.names: List[str] = list(dict.fromkeys(names))
        self.overwrite = overwrite
        self._check_targets()
        self._created: List[Path] = []
        self.staging: Optional[Path] = None

    def _check_targets(self) -> None:
        for name in self.names:
            target = self.folder / name
            if target.is_dir():
                raise InputError(target, "exists and is a folder; choose another output")
            if (target.exists() or target.is_symlink()) and not self.overwrite:
                raise InputError(target, "exists; pass --overwrite to replace it (nothing was written)")

    def paths(self) -> List[Path]:
        return [self.folder / n for n in self.names]

    def __enter__(self) -> Path:
        parent = self.folder.parent
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            os.chmod(d, 0o777 & ~umask())
            self._created.append(d)
        base = self.folder if self.folder.is_dir() else parent
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.crd-jax-", dir=base))
        return self.staging

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        except OSError as error:
            self._cleanup()
            raise InputError(self.folder, f"cannot write the outputs ({error.strerror})") from None
        except BaseException:
            self._cleanup()
            raise
        if exc_type is not None:
            self._cleanup()
            if issubclass(exc_type, OSError) and not issubclass(exc_type, InputError):
                raise InputError(self.folder, f"cannot write the outputs ({exc.strerror or exc})") from None
        return False

    def _commit(self) -> None:
        staged = {p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file()}
        unexpected, missing = staged - set(self.names), set(self.names) - staged
        if unexpected or missing:
            raise RuntimeError(f"output set mismatch: unexpected {sorted(unexpected)}, missing {sorted(missing)}")
        share_tree(self.staging)
        with _deferred_sigint(), _locked(self.folder.parent):
            self._check_targets()  # another process may have written them since we started
            if not self.folder.exists():
                os.rename(self.staging, self.folder)
                self.staging = None
                return
            for name in self.names:
                os.replace(self.staging / name, self.folder / name)
            shutil.rmtree(self.staging)  # now empty: our own staging folder
            self.staging = None

    def _cleanup(self) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)  # our own staging folder
        self.staging = None
        for d in reversed(self._created):  # folders this set created, deepest first, only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
