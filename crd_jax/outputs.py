"""Writing a command's outputs safely: all at once or not at all, never over what crd-jax did not write.

:class:`OutputSet` is how every command writes its files:

* before any computation it checks that the destination can be written (not a file, not a symlink loop,
  an existing ancestor that accepts a new entry) and that none of the files it will write exists already,
  unless ``overwrite`` is given; both failures are one-line :class:`InputError`\\ s;
* the files are written into a staging folder beside the destination (same file system), and only when
  the block finishes without error are they moved into place: the whole staging folder renamed onto a new
  destination, or each file renamed into an existing one while holding a lock on the parent folder, with
  SIGINT deferred so that Ctrl-C cannot cut the set in half;
* on any error (or Ctrl-C, or SIGTERM when the command line turned it into :class:`Terminated`) the staging
  folder and any folder the set created are removed: the file system is left exactly as it was; a staging
  folder left by a killed process (SIGKILL) is removed by the next set written beside it on the same machine
  (its name carries the machine's tag and the process id; only folders of this user, written on this machine,
  whose process has ended are removed: on a shared file system another machine's may still be in use);
* ``family``: every file the command can write there (with other options); with ``overwrite`` those this run
  does not write are removed when the new set lands (no mixed set of two runs), without it they are refused.

Files and folders get the permissions the user's umask gives (``tempfile`` creates 0600/0700).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import fcntl
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

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


def share_file(path: Union[str, os.PathLike]) -> None:
    """Gives a file created by ``tempfile`` (0600) the mode a plain ``open`` would have (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~umask())


def share_tree(path: Union[str, os.PathLike]) -> None:
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


def check_writable_folder(folder: Union[str, os.PathLike], what: str = "output folder") -> Path:
    """The checks an output folder must pass before anything is computed; returns it as an absolute path."""
    folder = Path(os.path.abspath(folder))
    too_long = [part for part in folder.parts if len(os.fsencode(part)) > 255]
    if too_long or len(os.fsencode(str(folder))) > 4000:
        raise InputError(
            folder if not too_long else too_long[0][:60] + "...",
            f"{what} path is too long (at most 255 bytes per name, 4000 in all)",
        )
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


class Terminated(BaseException):
    """SIGTERM, as the command line raises it (like ``KeyboardInterrupt`` for SIGINT): cleanup runs."""


#: SIGINT/SIGTERM the command line's handlers saw (:func:`note_signal`): an exception raised inside a callback
#: (JAX's garbage-collection hook, a C extension's initialisation) can be swallowed or turned into another error,
#: so an output set also asks here before it lands
_SIGNALS: List[int] = []


def note_signal(signum: int) -> None:
    """Records that SIGINT or SIGTERM reached the command line's handler (which then raises)."""
    _SIGNALS.append(int(signum))


def clear_noted_signals() -> None:
    """Forgets recorded signals (a command line starting a new command in this process)."""
    _SIGNALS.clear()


def noted_signal() -> Optional[int]:
    """The first SIGINT/SIGTERM :func:`note_signal` recorded in this process, or None."""
    return _SIGNALS[0] if _SIGNALS else None


def raise_for_signal(signum: int) -> None:
    """The exception a signal stands for: ``KeyboardInterrupt`` (SIGINT) or :class:`Terminated` (SIGTERM)."""
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_if_signalled() -> None:
    """Raises :func:`raise_for_signal`'s exception if the command line recorded a signal: what writes a result
    (an output set, a model folder) asks this before it lands."""
    signum = noted_signal()
    if signum is not None:
        raise_for_signal(signum)


def check_plain_name(name: str, source: Union[str, os.PathLike]) -> str:
    """``name`` must be one plain file name: no folder separator, not ``.``/``..``, no NUL, not empty (an id
    that becomes part of a file name must never lead the writer out of its output folder)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip():
        raise InputError(source, f"{name!r} is not a plain file name (no '/', '..', spaces at the ends)")
    return name


@contextlib.contextmanager
def _deferred_sigint():
    """Holds SIGINT and SIGTERM back while a set of renames runs (main thread only); a signal that came in the
    meantime is delivered again to the previous handler afterwards."""
    pending = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(pending):
            os.kill(os.getpid(), signum)  # the previous handler runs now (KeyboardInterrupt, Terminated, ...)


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

    def __init__(
        self, folder, names: Iterable[str], overwrite: bool = False, what: str = "output folder", family: Iterable[str] = ()
    ):
        self.folder = check_writable_folder(folder, what)
        self.names: List[str] = [check_plain_name(n, Path(folder) / n) for n in dict.fromkeys(names)]
        self.family: List[str] = [n for n in dict.fromkeys(family) if n not in self.names]
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
        for name in self.family:
            target = self.folder / name
            if (target.exists() or target.is_symlink()) and not self.overwrite:
                raise InputError(
                    target,
                    "is an output of an earlier run that this run does not write; pass --overwrite "
                    "to replace the earlier set (nothing was written)",
                )

    def stale(self) -> List[Path]:
        """Files of the command's family, not written by this run, that exist in the folder now."""
        return [
            self.folder / n
            for n in self.family
            if ((self.folder / n).is_file() or (self.folder / n).is_symlink()) and not (self.folder / n).is_dir()
        ]

    def paths(self) -> List[Path]:
        return [self.folder / n for n in self.names]

    def __enter__(self) -> Path:
        parent = self.folder.parent
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                os.chmod(d, 0o777 & ~umask())
                self._created.append(d)
            base = self.folder if self.folder.is_dir() else parent
            remove_stale_staging(base)
            self.staging = Path(
                tempfile.mkdtemp(prefix=f".{self.folder.name[:100]}.crd-jax-{host_tag()}-{os.getpid()}-", dir=base)
            )
        except OSError as exc:
            self._cleanup()
            raise InputError(self.folder, f"cannot write the outputs ({exc.strerror or exc})") from None
        return self.staging

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                raise_if_signalled()  # interrupted, though the exception never reached this block
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
            for path in self.stale():  # an earlier run's outputs this run does not write (checked with --overwrite)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _cleanup(self) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)  # our own staging folder
        self.staging = None
        for d in reversed(self._created):  # folders this set created, deepest first, only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()


_STAGING = re.compile(r"^\..+\.crd-jax-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+$")


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """Eight hex digits naming where this process's ids mean something (its host name and process-id
    namespace, hashed) in a staging folder's name: on a file system that several machines or containers share
    (a cluster's output folder), a process id says whether a process is alive only where it was issued."""
    import hashlib
    import socket

    try:
        namespace = os.readlink("/proc/self/ns/pid")  # containers on one host share its name, not their pids
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(base: Union[str, os.PathLike]) -> List[Path]:
    """Removes the staging folders in ``base`` that a killed crd-jax process of this machine left behind: hidden
    folders named ``.<name>.crd-jax-<host>-<pid>-<random>``, with this machine's :func:`host_tag`, owned by this
    user, whose process no longer runs. Another machine's (a shared file system) are never touched: their process
    may be running there. Returns them."""
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    here = host_tag()
    for entry in entries:
        match = _STAGING.match(entry.name)
        if not match or match.group(1) != here or int(match.group(2)) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        import stat as _stat

        if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _alive(int(match.group(2))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
