"""The native convolution is built when the package is installed, used without a compiler at run time, and
the install still works (on the lax.conv path) where no compiler exists.

Each test builds a real wheel of a copy of the project with ``pip wheel --no-build-isolation`` (this
environment's setuptools and jaxlib stand in for the build environment) and runs the unpacked wheel in a fresh
interpreter whose ``PATH`` holds no compiler.
"""

import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
X86_LINUX = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernel is for JAX on the CPU")

PROBE = (
    "import warnings, numpy as np, jax, jax.numpy as jnp\n"
    "from crd_jax.ops import native\nfrom crd_jax.ops.conv import conv, conv_reference\n"
    "x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 8, 7, 4)), jnp.float32)\n"
    "w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4, 16)), jnp.float32)\n"
    "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
    "    y = conv(x, w, jnp.zeros(16))\n"
    "err = float(jnp.abs(y - conv_reference(x, w, jnp.zeros(16))).max())\n"
    "print(native.describe()); print(len([c for c in caught if 'lax.conv' in str(c.message)]), err)\n"
)


def _wheel(tmp: Path, with_compiler: bool) -> Path:
    """Builds a wheel of a copy of the project (no compiled library, no caches) and unpacks it; returns the
    folder to put on PYTHONPATH."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "crd_jax", src / "crd_jax", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC", "CRD_JAX_BUILD_NATIVE")}
    if not with_compiler:
        (tmp / "empty-bin").mkdir()
        env["PATH"] = str(tmp / "empty-bin")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                           "-w", str(tmp / "wheels"), str(src)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "wheels").glob("crd_jax-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def _probe(site: Path, tmp: Path, **extra) -> subprocess.CompletedProcess:
    """Runs PROBE on the unpacked wheel with no compiler on PATH and an empty crd-jax cache."""
    (tmp / "no-bin").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CRD_JAX_FAST_CONV", "CRD_JAX_ISA")}
    env.update(PYTHONPATH=str(site), PATH=str(tmp / "no-bin"), CRD_JAX_CACHE_DIR=str(tmp / "cache"), **extra)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=tmp)


def _kernel_files(site: Path) -> list:
    return sorted(p.name for p in (site / "crd_jax" / "ops").glob("_kernels*"))


@pytest.mark.slow
def test_install_without_a_compiler_runs_lax_conv_with_one_warning_and_fast_conv_1_fails_loudly(tmp_path):
    site = _wheel(tmp_path, with_compiler=False)
    assert _kernel_files(site) == []
    proc = _probe(site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    described, (warned, err) = proc.stdout.splitlines()[0], proc.stdout.splitlines()[1].split()
    assert described.startswith("lax.conv (no C++ compiler") and warned == "1" and float(err) < 1e-4
    proc = _probe(site, tmp_path, CRD_JAX_FAST_CONV="1")
    assert proc.returncode != 0 and "CRD_JAX_FAST_CONV=1 but the native CPU convolution is unavailable" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not X86_LINUX or shutil.which("g++") is None, reason="needs x86-64 Linux and g++")
def test_install_builds_the_kernel_which_runs_without_a_compiler_and_is_refused_once_its_source_changes(tmp_path):
    site = _wheel(tmp_path, with_compiler=True)
    assert len(_kernel_files(site)) == 1
    proc = _probe(site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    described, (warned, err) = proc.stdout.splitlines()[0], proc.stdout.splitlines()[1].split()
    assert described.startswith("native CPU kernel") and "built at install" in described
    assert warned == "0" and float(err) < 1e-4
    assert not any((tmp_path / "cache").rglob("*.so")), "nothing may be compiled on first use"
    # An edited kernel no longer matches the installed library's build key: that library is not loaded, and
    # with no compiler to build the new source the lax path runs.
    source = site / "crd_jax" / "ops" / "csrc" / "conv_cpu.cc"
    source.write_text(source.read_text() + "\n// edited\n")
    proc = _probe(site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("lax.conv (no C++ compiler")


@pytest.mark.slow
@pytest.mark.skipif(not X86_LINUX or shutil.which("g++") is None, reason="needs g++ on x86-64 Linux")
def test_kernel_source_compiles_without_the_amx_path():
    """A compiler older than GCC 11 / clang 12 has no AMX intrinsics: the kernel then builds without that path
    (``CRD_AMX`` 0, as such a compiler's version test sets it) rather than failing and leaving lax.conv."""
    import jax.ffi

    from crd_jax.ops import native_build

    cmd = ["g++", *native_build.FLAGS, "-fsyntax-only", "-DCRD_AMX=0", "-I", jax.ffi.include_dir(),
           str(native_build.CSRC / "conv_cpu.cc")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
