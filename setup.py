"""Builds the native CPU kernels when crd-jax is installed (``pip install .`` or ``pip install -e .``).

The kernels (``crd_jax/ops/csrc/``: the 3-D convolution and the volume warp) are compiled against the XLA FFI
headers of the jaxlib in the build environment (pyproject.toml's build requirements) into
``crd_jax/ops/_kernels<suffix>``, a plain shared library that :mod:`crd_jax.ops.native` loads with ctypes.
The build is optional: without a C++ compiler, off x86-64 Linux, or with ``CRD_JAX_BUILD_NATIVE=0``, the
install goes on without it and crd-jax runs ``lax.conv`` and XLA's gathers (or builds the kernels on first
use if a compiler appears later).
"""

import importlib.util
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _native_build():
    # Loaded by path: importing the package would import its dependencies, absent from the build environment.
    spec = importlib.util.spec_from_file_location("crd_native_build", HERE / "crd_jax" / "ops" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nb = _native_build()


class BuildNativeKernels(build_ext):
    """Compiles the kernels with the same command as the first-use build (``native_build.compile_library``)."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        try:
            jaxlib = importlib.util.find_spec("jaxlib")
            if jaxlib is None:
                raise RuntimeError("jaxlib is not in the build environment (its FFI headers are needed)")
            include = str(Path(jaxlib.submodule_search_locations[0]) / "include")
            key = nb.build_key(nb.source_bytes(), metadata.version("jaxlib"))
            nb.compile_library(target, include, key)
        except Exception as exc:  # the package works without the kernel
            print(f"crd-jax: native CPU kernels not built ({str(exc).splitlines()[0]}); crd-jax will use "
                  "lax.conv, or build them on first use if a C++ compiler is found", file=sys.stderr)
            return
        print(f"crd-jax: built the native CPU kernels {target.name} (key {key})", file=sys.stderr)


def _extensions():
    wanted = os.environ.get("CRD_JAX_BUILD_NATIVE", "1") != "0"
    if not wanted or not nb.supported_platform(platform.system(), platform.machine()):
        return []
    return [Extension(f"crd_jax.ops.{nb.INSTALLED_NAME}", sources=[str(p.relative_to(HERE)) for p in nb.SOURCES])]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildNativeKernels})
