"""Builds, caches and registers the CPU convolution kernels (``csrc/conv_cpu.cc``) as XLA FFI targets.

The kernel is compiled on first use with the system C++ compiler against the FFI headers that jaxlib
ships (``jax.ffi.include_dir()``), into a per-user cache keyed by the source, the compiler flags and the
jaxlib version. Compilation takes a few seconds once. Where it is impossible (no compiler, not x86-64,
no AVX2/FMA, or ``CRD_JAX_FAST_CONV=0``) :func:`available` is False and callers use ``lax.conv``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax

_SOURCE = Path(__file__).with_name("csrc") / "conv_cpu.cc"
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-fno-math-errno"]
_TARGETS = {"crd_conv_fwd": "CrdConvFwd", "crd_conv_wgrad": "CrdConvWgrad"}

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("CRD_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "crd_jax"
    )
    return Path(root)


def _library_path() -> Path:
    import jaxlib

    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(_FLAGS).encode())
    key.update(jaxlib.__version__.encode())
    return cache_dir() / f"conv_cpu-{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> bool:
    if os.environ.get("CRD_JAX_FAST_CONV", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    path = _library_path()
    if not path.exists():
        _compile(path)
    lib = ctypes.CDLL(str(path))
    if not lib.crd_cpu_supported():
        return False
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _state["lib"] = lib
    return True


def available() -> bool:
    """True when the native CPU convolution is compiled, loaded and registered."""
    with _lock:
        if "ok" not in _state:
            try:
                _state["ok"] = _load()
            except Exception as exc:  # any failure means: use the portable path
                warnings.warn(f"crd_jax: fast CPU convolution unavailable, using lax.conv ({exc})")
                _state["ok"] = False
        return _state["ok"]
