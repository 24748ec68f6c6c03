"""Where the native CPU kernel (``csrc/``) lives once built, what it was built from, and how to rebuild it.

The kernel is compiled when crd-jax is installed (``pip install``, ``pip wheel``: scikit-build-core runs
``csrc/CMakeLists.txt``) into one shared library, ``crd_jax/ops/_kernels.so``, which
:mod:`crd_jax.ops.native` loads. Nothing is compiled inside a user's process unless asked: :func:`rebuild`
(``crd-jax build-kernel``) builds it again in place, for the jaxlib installed now, with CMake and the system's
C++ compiler, after a jaxlib upgrade or an edit of the kernel's sources.

The library records what it was built from (``csrc/control_api.cc``): the jaxlib whose XLA FFI headers it was
compiled against (XLA checks the FFI version at call time, so a library built for another jaxlib must not
run) and :func:`source_hash` of the sources it was compiled from. The loader refuses a library whose record
differs from the running jaxlib or the sources on disk.

Standard library only at import: the command line imports it to rebuild a kernel that cannot load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
LIBRARY_NAME = "_kernels.so"  # a plain shared library loaded with ctypes, not a Python extension module
MODULE_NAME = "crd_jax.ops._kernels"  # the name import machinery (and an editable install's finder) knows it by


def supported_platform(system: str, machine: str) -> bool:
    """The kernel is x86-64 (AVX2/FMA, AVX-512 where present) and uses Linux's affinity, cgroup and madvise."""
    return system == "Linux" and machine.lower() in ("x86_64", "amd64")


def hashed_files(folder: Path = CSRC) -> list[Path]:
    """The files :func:`source_hash` covers: every ``*.cc``, ``*.h`` and ``CMakeLists.txt`` of ``folder``."""
    files = [p for p in folder.iterdir() if p.suffix in (".cc", ".h") or p.name == "CMakeLists.txt"]
    return sorted(files, key=lambda p: p.name)


def source_hash(folder: Path = CSRC) -> str:
    """What the kernel is built from: sha256 of the lines ``"<name> <sha256 of the file>"`` of
    :func:`hashed_files`, sorted by name, first 16 hex digits. ``csrc/CMakeLists.txt`` computes the same text
    and compiles the result into the library. "" where the folder holds no sources."""
    if not folder.is_dir():
        return ""
    text = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in hashed_files(folder))
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""


def library_path() -> Path | None:
    """The built kernel: where import machinery finds ``crd_jax.ops._kernels`` (the package folder, or an
    editable install's build output), else None."""
    try:
        spec = importlib.util.find_spec(MODULE_NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).is_file():
        return Path(spec.origin)
    local = Path(__file__).with_name(LIBRARY_NAME)
    return local if local.is_file() else None


def _program(name: str) -> str | None:
    """``cmake`` or ``ninja`` from PATH, else from the PyPI package of that name (``pip install cmake ninja``)."""
    found = shutil.which(name)
    if found is None and importlib.util.find_spec(name) is not None:
        module = __import__(name)
        candidate = Path(getattr(module, "BIN_DIR", getattr(module, "CMAKE_BIN_DIR", ""))) / name
        found = str(candidate) if candidate.is_file() else None
    return found


def _built_record(path: Path) -> tuple[str, str]:
    """(jaxlib, source hash) a library was built for, read in a child process (loading it here would pin the
    old file in this process)."""
    code = (
        "import ctypes, sys\nlib = ctypes.CDLL(sys.argv[1])\n"
        "for name in ('crd_built_for_jaxlib', 'crd_source_hash'):\n"
        "    f = getattr(lib, name, None)\n"
        "    if f is not None: f.restype = ctypes.c_char_p\n"
        "    print(f().decode() if f is not None else '')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    lines = proc.stdout.splitlines() if proc.returncode == 0 else []
    return (lines[0], lines[1]) if len(lines) == 2 else ("", "")


def rebuild(force: bool = False) -> str:
    """Builds the native CPU kernel again, in place, for the jaxlib installed now; returns one line saying what
    it did. Without ``force`` a library already built for this jaxlib and these sources is kept.

    Needs CMake (>= 3.18; on PATH or ``pip install cmake``) and a C++ compiler (GCC >= 10 or clang >= 9; set
    CXX to choose one). Raises RuntimeError with the reason when it cannot build. A process that already
    loaded the kernel keeps the old one until it restarts.
    """
    import platform

    if not supported_platform(platform.system(), platform.machine()):
        raise RuntimeError(f"the native kernel is for x86-64 Linux, this is {platform.system()} {platform.machine()}")
    if not (CSRC / "CMakeLists.txt").is_file():
        raise RuntimeError(f"the kernel's sources are missing from {CSRC}")
    jaxlib = metadata.version("jaxlib")
    sources = source_hash()
    target = library_path() or Path(__file__).with_name(LIBRARY_NAME)
    if not force and target.is_file() and _built_record(target) == (jaxlib, sources):
        return f"the native CPU kernel is up to date (jaxlib {jaxlib}, sources {sources}): {target}"
    cmake = _program("cmake")
    if cmake is None:
        raise RuntimeError("CMake not found: install it (pip install cmake ninja, or the system's package)")
    import jax.ffi  # only here: the headers of the running jaxlib

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crd-jax-kernel-") as build:
        configure = [
            cmake,
            "-S",
            str(CSRC),
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCRD_JAX_FFI_INCLUDE_DIR={jax.ffi.include_dir()}",
            f"-DCRD_JAXLIB_VERSION={jaxlib}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        ninja = _program("ninja")
        if ninja is not None:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        env = {k: v for k, v in os.environ.items() if k != "CRD_JAX_BUILD_NATIVE"}  # asked for: build it
        said = ""
        for cmd in (configure, [cmake, "--build", build, "--parallel"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            said += proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(f"building the native kernel failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        built = Path(build) / LIBRARY_NAME
        if not built.is_file():  # CMake skipped it and said why (a warning naming the reason)
            why = " ".join(said.split())
            start_at = why.find("crd-jax: the native CPU kernel is not built")
            raise RuntimeError(why[start_at:].split(";")[0] + ")" if start_at >= 0 else "CMake built no kernel library")
        # Written under a private name and renamed: a process loading the kernel never sees half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(built, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return f"built the native CPU kernel for jaxlib {jaxlib} (sources {sources}) in {time.perf_counter() - start:.0f} s: {target}"
