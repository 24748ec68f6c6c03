"""The native kernel as a package: built at install by scikit-build-core + CMake, carried built in a wheel that
runs without a compiler, refused (one warning, lax.conv) when stale, and never compiled in a user's process.

The wheel tests build a real wheel of a copy of the project with ``pip wheel --no-build-isolation`` (this
environment's scikit-build-core, CMake, jax and jaxlib stand in for the build environment), install it with
pip into a fresh venv that sees this environment's other packages, and run it in a fresh interpreter whose
PATH holds no compiler.
"""

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import pytest

from crd_jax.ops import native, native_build

ROOT = Path(__file__).resolve().parents[1]
X86_LINUX = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
COMPILER = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernel is for JAX on the CPU")
needs_build = pytest.mark.skipif(not X86_LINUX or COMPILER is None, reason="needs x86-64 Linux and a C++ compiler")

# Run by the installed wheel: which path it runs, how many lax.conv warnings, and a small conv against lax.
PROBE = (
    "import shutil, warnings, numpy as np, jax, jax.numpy as jnp\n"
    "import crd_jax\nfrom crd_jax.ops import native\nfrom crd_jax.ops.conv import conv, conv_reference\n"
    "assert not any(shutil.which(c) for c in ('g++', 'gcc', 'c++', 'cc', 'clang++')), 'a compiler is on PATH'\n"
    "x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 8, 7, 4)), jnp.float32)\n"
    "w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4, 16)), jnp.float32)\n"
    "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
    "    y = conv(x, w, jnp.zeros(16), negative_slope=0.2)\n"
    "err = float(jnp.abs(y - conv_reference(x, w, jnp.zeros(16), negative_slope=0.2)).max())\n"
    "print(native.describe()); print(len([c for c in caught if 'lax.conv' in str(c.message)]), err)\n"
    "print(crd_jax.__file__)\n"
)
# The same with the running jaxlib's version reported as another one (a jaxlib upgraded since the install).
STALE_JAXLIB = (
    "import importlib.metadata as m\nreal = m.version\nm.version = lambda name: '0.0.1' if name == 'jaxlib' else real(name)\n"
)


def _project_copy(tmp: Path) -> Path:
    """The project's tracked files, as a clean clone has them (no build outputs, no caches)."""
    src = tmp / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file() and not name.startswith(("benchmarks/results", "tests/")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    return src


def _bin_without_compilers(tmp: Path) -> Path:
    """A PATH folder holding only what a build or a run may use: CMake and Ninja, no compiler."""
    folder = tmp / "bin-no-compiler"
    folder.mkdir(exist_ok=True)
    for tool in ("cmake", "ninja"):
        found = shutil.which(tool) or str(Path(sys.executable).parent / tool)
        if Path(found).exists() and not (folder / tool).exists():
            (folder / tool).symlink_to(found)
    return folder


def _build_wheel(tmp: Path, with_compiler: bool) -> Path:
    src = _project_copy(tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC", "CRD_JAX_BUILD_NATIVE")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if not with_compiler:
        env["PATH"] = str(_bin_without_compilers(tmp))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp / "wheels"), str(src)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp / "wheels").glob("crd_jax-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp: Path) -> Path:
    """A fresh venv with the wheel installed by pip (no dependencies), seeing this environment's site-packages
    for jax and the rest (a path line, so this environment's editable crd-jax finder is not loaded)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "test-env-packages.pth").write_text("\n".join(ours) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


def _run(python: Path, tmp: Path, code: str, **extra) -> subprocess.CompletedProcess:
    """``code`` in the venv, PATH stripped of compilers, CC/CXX unset, away from the source tree."""
    drop = ("CXX", "CC", "CRD_JAX_FAST_CONV", "CRD_JAX_ISA", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=os.pathsep.join([str(python.parent), str(_bin_without_compilers(tmp))]), **extra)
    return subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, cwd=tmp)


def _probe(python: Path, tmp: Path, prefix: str = "", **extra):
    proc = _run(python, tmp, prefix + PROBE, **extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    described, counts, where = proc.stdout.splitlines()[-3:]
    warned, err = counts.split()
    return described, int(warned), float(err), where


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    return _build_wheel(tmp, with_compiler=True)


@pytest.mark.slow
@needs_build
def test_wheel_runs_the_native_kernel_without_a_compiler_and_refuses_it_when_stale(built_wheel, tmp_path):
    names = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(built_wheel)], capture_output=True, text=True, check=True
    ).stdout
    assert "crd_jax/ops/_kernels.so" in names and "crd_jax/ops/csrc/CMakeLists.txt" in names
    assert re.search(r"-py3-none-linux_x86_64\.whl$", built_wheel.name), built_wheel.name
    python = _venv_with(built_wheel, tmp_path)

    described, warned, err, where = _probe(python, tmp_path)
    print(f"wheel {built_wheel.name}, installed at {where}, no compiler on PATH: {described}; |conv - lax| = {err:.2e}")
    assert str(tmp_path / "venv") in where
    assert described.startswith("native CPU kernel") and f"jaxlib {metadata.version('jaxlib')}" in described
    assert warned == 0 and err < 1e-4

    # Built for another jaxlib: one warning, lax.conv, and what to run.
    described, warned, err, _ = _probe(python, tmp_path, prefix=STALE_JAXLIB)
    assert described.startswith("lax.conv (the native kernel was built for jaxlib")
    assert "this is jaxlib 0.0.1; run `crd-jax build-kernel`" in described and warned == 1 and err < 1e-4

    # The installed sources edited: refused the same way, and nothing is compiled (no compiler, no cache).
    installed = Path(where).parent / "ops"
    source = installed / "csrc" / "conv_direct.cc"
    source.write_text(source.read_text() + "\n// edited\n")
    described, warned, _, _ = _probe(python, tmp_path)
    assert described.startswith("lax.conv (the kernel's sources changed since it was built") and warned == 1
    assert sorted(p.name for p in installed.glob("_kernels*")) == ["_kernels.so"]


@pytest.mark.slow
@needs_build
def test_rebuild_builds_the_kernel_in_place_for_the_sources_and_jaxlib_installed(built_wheel, tmp_path):
    python = _venv_with(built_wheel, tmp_path)
    installed = Path(_run(python, tmp_path, "import crd_jax.ops as o; print(o.__path__[0])").stdout.strip())
    source = installed / "csrc" / "dispatch.cc"
    source.write_text(source.read_text() + "\n// edited\n")
    env = {"PATH": os.pathsep.join([str(python.parent), os.environ["PATH"]])}
    proc = subprocess.run(
        [str(python), "-c", "from crd_jax.ops import native_build\nprint(native_build.rebuild()); print(native_build.rebuild())"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built, again = proc.stdout.splitlines()[-2:]
    assert built.startswith(f"built the native CPU kernel for jaxlib {metadata.version('jaxlib')}")
    assert str(installed / "_kernels.so") in built and again.startswith("the native CPU kernel is up to date")
    described, warned, err, _ = _probe(python, tmp_path)
    assert described.startswith("native CPU kernel") and warned == 0 and err < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cmake") is None and shutil.which("cmake", path=str(Path(sys.executable).parent)) is None, reason="needs CMake"
)
def test_install_without_a_compiler_runs_lax_conv_with_one_warning_and_fast_conv_1_fails_loudly(tmp_path):
    wheel = _build_wheel(tmp_path, with_compiler=False)
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout
    assert "_kernels" not in names
    python = _venv_with(wheel, tmp_path)
    described, warned, err, _ = _probe(python, tmp_path)
    assert described.startswith("lax.conv (the native kernel was not built when crd-jax was installed")
    assert warned == 1 and err < 1e-4
    proc = _run(python, tmp_path, PROBE, CRD_JAX_FAST_CONV="1")
    assert proc.returncode != 0 and "CRD_JAX_FAST_CONV=1 but the native CPU convolution is unavailable" in proc.stderr


def _installed_library() -> Path:
    path = native_build.library_path()
    if path is None or not native.available():
        pytest.skip("the native kernel is not built in this environment")
    return path


def test_the_installed_kernel_records_the_jaxlib_and_sources_it_was_built_from():
    lib = ctypes.CDLL(str(_installed_library()))
    lib.crd_built_for_jaxlib.restype = lib.crd_source_hash.restype = ctypes.c_char_p
    assert lib.crd_built_for_jaxlib().decode() == metadata.version("jaxlib")
    assert lib.crd_source_hash().decode() == native_build.source_hash() != ""


def test_no_avx512_instruction_outside_the_avx512_and_amx_code():
    """Per-file flags put AVX-512 code in the AVX-512 files only: no other function of the library (the baseline
    files', the thread pool, the C++ library's templates) may carry an AVX-512 or AMX instruction, or it would
    fault on a CPU with AVX2 only."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    out = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(_installed_library())], capture_output=True, text=True, check=True
    ).stdout
    evex = re.compile(
        r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|vpternlog|vmovdq[au](8|16|32|64)|vdpbf16ps"
        r"|vcvtne2ps2bf16|tdpbf16ps|tileloadd|ldtilecfg"
    )
    allowed = ("crd::avx512::", "crd::amx::", "crd::winograd::")
    function, isa_functions, outside = "", set(), set()
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif evex.search(line):
            isa_functions.add(function)
            if not any(a in function for a in allowed):
                outside.add(function)
    assert len(isa_functions) > 20, "the AVX-512 code is missing (or the check no longer sees it)"
    assert not outside, sorted(outside)[:10]


@pytest.mark.slow
@needs_build
def test_kernel_source_compiles_without_the_amx_path():
    """A compiler older than GCC 11 / clang 12 has no AMX intrinsics: CMake then compiles conv_amx.cc without them
    (``CRD_AMX`` 0) rather than failing and leaving lax.conv."""
    flags = ["-std=c++17", "-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx512bf16"]
    cmd = [COMPILER, *flags, "-fsyntax-only", "-DCRD_AMX=0", "-I", jax.ffi.include_dir(), str(native_build.CSRC / "conv_amx.cc")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_cmake_source_lists_name_every_kernel_file():
    """Every .cc file of csrc/ is in exactly one of CMakeLists.txt's lists (a file left out would not be built;
    the lists are explicit so that each file gets its instruction set's flags)."""
    text = (native_build.CSRC / "CMakeLists.txt").read_text()
    listed = re.findall(r"^\s+(\w+\.cc)\b", text, flags=re.M)
    assert sorted(listed) == sorted(p.name for p in native_build.CSRC.glob("*.cc"))
    assert len(listed) == len(set(listed))
