"""Builds, caches and registers the CPU convolution kernels (``csrc/conv_cpu.cc``) as XLA FFI targets.

The kernel is compiled on first use with the system C++ compiler against the FFI headers that jaxlib
ships (``jax.ffi.include_dir()``), into a per-user cache keyed by the source, the compiler flags and the
jaxlib version. Compilation takes a few seconds once. Where it is impossible (no compiler, not x86-64,
no AVX2/FMA, or ``CRD_JAX_FAST_CONV=0``) :func:`available` is False, one warning says why, and callers use
``lax.conv``; ``CRD_JAX_FAST_CONV=1`` makes that an error instead. It is never built or loaded when JAX's
default backend is not the CPU (a GPU host runs ``lax.conv`` on the GPU).

Vector width: the forward convolution uses AVX-512 where the CPU has it (``CRD_JAX_ISA=avx2`` or
:func:`set_isa` selects the AVX2 path, which every supported CPU runs), the few-output-channel flow head
too when its input channels are a multiple of 16; the weight gradient uses AVX2.

Memory: each forward call asks the kernel for transparent huge pages on its output buffer before writing it
(``madvise``; a hint, ignored where THP is off, ``CRD_JAX_HUGEPAGES=0`` turns it off): a fresh
full-resolution output otherwise takes ~13,000 page faults per call.

Threads: one persistent pool per process, sized by the CPUs the process may use (its affinity mask, capped
by a cgroup CPU quota) or ``CRD_JAX_NUM_THREADS``.
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
_TARGETS = {"crd_conv_fwd": "CrdConvFwd", "crd_conv_upcat_fwd": "CrdConvUpcatFwd", "crd_conv_wgrad": "CrdConvWgrad"}

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
    """True when the native CPU convolution is compiled, loaded and registered (and JAX runs on the CPU)."""
    with _lock:
        if "ok" not in _state:
            required = os.environ.get("CRD_JAX_FAST_CONV") == "1"
            if jax.default_backend() != "cpu":
                _state["ok"], _state["why"] = False, f"JAX runs on {jax.default_backend()}"
            else:
                try:
                    _state["ok"] = _load()
                    if not _state["ok"]:
                        _state["why"] = _why_not()
                except Exception as exc:  # any failure means: use the portable path
                    _state["ok"], _state["why"] = False, str(exc).splitlines()[0]
                if not _state["ok"] and _state["why"] != "CRD_JAX_FAST_CONV=0":
                    if required:
                        raise RuntimeError(f"CRD_JAX_FAST_CONV=1 but the native CPU convolution is unavailable: {_state['why']}")
                    warnings.warn(f"crd_jax: fast CPU convolution unavailable, using lax.conv ({_state['why']})", stacklevel=2)
        return _state["ok"]


def _why_not() -> str:
    if os.environ.get("CRD_JAX_FAST_CONV", "") == "0":
        return "CRD_JAX_FAST_CONV=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    return "the CPU lacks AVX2/FMA"


def threads() -> int:
    """Threads the native kernel uses (0 when it is not in use)."""
    return int(_state["lib"].crd_num_threads()) if available() else 0


_ISA_NAMES = {0: "avx2", 1: "avx512"}


def has_bf16() -> bool:
    """True when the native kernel runs and the CPU has AVX512-BF16 (the opt-in bfloat16 inference path)."""
    return available() and bool(_state["lib"].crd_has_bf16())


def isa() -> str:
    """The forward kernel's vector width: ``"avx512"`` where the CPU has it, else ``"avx2"`` ("" when unused)."""
    return _ISA_NAMES[int(_state["lib"].crd_isa())] if available() else ""


def set_isa(name: str) -> str:
    """Selects the forward kernel's vector width for this process (tests and benchmarks compare the two).

    ``CRD_JAX_ISA=avx2`` does the same from the environment. AVX-512 is refused where the CPU lacks it; the
    width in use is returned.
    """
    if name not in ("avx2", "avx512"):
        raise ValueError(f"isa must be 'avx2' or 'avx512', not {name!r}")
    if not available():
        return ""
    return _ISA_NAMES[int(_state["lib"].crd_set_isa(1 if name == "avx512" else 0))]


def describe() -> str:
    """Which convolution path this process runs, for logs, results files and ``crd-jax --version``."""
    if available():
        width = "AVX-512" if isa() == "avx512" else "AVX2/FMA"
        return f"native CPU kernel ({width}, {threads()} threads)"
    return f"lax.conv ({_state.get('why', 'native kernel unavailable')})"
