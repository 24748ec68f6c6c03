"""How the native CPU kernels (``csrc/``: the convolution and the volume warp) are compiled: one place for ``setup.py`` (the build
when the package is installed) and :mod:`crd_jax.ops.native` (the fallback build into the user cache).

This module imports nothing outside the standard library, so that ``setup.py`` can load it in pip's build
environment before crd-jax or JAX are importable.

The *build key* names what a compiled library was built from: the kernel's source, the compiler flags and
the jaxlib whose XLA FFI headers it was compiled against (XLA's FFI checks the exact API version at call
time, so a library built against another jaxlib must not be used). The library exports it as
``crd_build_key()``; the loader uses an installed library only when its key equals the one computed from
the running jaxlib and the source on disk (an edited kernel or an upgraded jaxlib falls back to a cached
build).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "conv_cpu.cc", CSRC / "warp_cpu.cc", CSRC / "warp_grad_cpu.cc"]  # compiled into one library
HEADERS = [CSRC / "parallel.h", CSRC / "winograd.h"]
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-mavx2", "-mfma", "-fno-math-errno"]
KEY_MACRO = "CRD_BUILD_KEY"
# The installed library's module name: crd_jax/ops/_kernels<EXTENSION_SUFFIX> (a plain shared library
# loaded with ctypes, not a Python extension module; the suffix only keeps wheels platform-tagged).
INSTALLED_NAME = "_kernels"


def supported_platform(system: str, machine: str) -> bool:
    """The kernel is x86-64 (AVX2/FMA, AVX-512 where present) and uses Linux's affinity, cgroup and madvise."""
    return system == "Linux" and machine.lower() in ("x86_64", "amd64")


def source_bytes() -> bytes:
    """Every file the library is compiled from, in a fixed order (what the build key covers)."""
    return b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in SOURCES + HEADERS)


def build_key(source: bytes, jaxlib_version: str) -> str:
    key = hashlib.sha256()
    key.update(source)
    key.update(" ".join(FLAGS).encode())
    key.update(jaxlib_version.encode())
    return key.hexdigest()[:16]


def find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def compile_library(target: Path, include_dir: str, key: str, compiler: str | None = None) -> None:
    """Compiles ``SOURCES`` into the shared library ``target`` (written under a private name and renamed, so
    that concurrent processes never load a half-written file). Raises RuntimeError with the compiler's
    message on failure."""
    import tempfile

    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, "-shared", f'-D{KEY_MACRO}="{key}"', "-I", include_dir, *map(str, SOURCES), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the native kernels failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

