"""Loads and registers the native CPU kernels (``csrc/``: the convolution and the volume warp of ``crd-jax
register``) as XLA FFI targets.

The kernels are compiled when crd-jax is installed (scikit-build-core + CMake, against the XLA FFI headers of
jaxlib: :mod:`crd_jax.ops.native_build`) into one library ``_kernels.so`` beside this module; a wheel carries it
built, so no compiler is needed to use it. Nothing is compiled at run time. The library is used when it was
built for the running jaxlib and from the sources on disk; otherwise (another jaxlib since the install, an
edited kernel, no compiler at install time, not x86-64 Linux, no AVX2/FMA, or ``CRD_JAX_FAST_CONV=0``)
:func:`available` is False, one warning says why (and, where a rebuild would help, to run ``crd-jax
build-kernel``), and callers use ``lax.conv`` (and XLA's gathers for the warp); ``CRD_JAX_FAST_CONV=1`` makes
that an error instead. It is never loaded when JAX's default backend is not the CPU (a GPU host runs
``lax.conv`` on the GPU).

Vector width: the forward convolution uses AVX-512 where the CPU has it (``CRD_JAX_ISA=avx2`` or
:func:`set_isa` selects the AVX2 path, which every supported CPU runs), the few-output-channel flow head
too when its input channels are a multiple of 16; the weight gradient's blocked kernel (``csrc/wgrad_blocked.h``)
runs at the same width, and on AVX-512 the stride-1 3^3 layers with at least 8 channels on each side from 16^3 up
take it in the Winograd domain (``CRD_JAX_WGRAD=blocked|winograd|rows`` or :func:`set_wgrad` chooses). On AVX-512 the stride-1 3^3
layers whose output channels are a multiple of 16 and with 8 to 128 input channels (every decoder layer of VM;
:func:`winograd_min_input_channels`, ``CRD_JAX_WINOGRAD_MIN_CHANNELS``) run as Winograd F(2x2x2, 3x3x3), 64
instead of 216 multiply-adds per 2x2x2 outputs, equal to the direct
kernel to float32 rounding (``CRD_JAX_WINOGRAD=0`` or :func:`set_winograd` keeps the direct kernel). The opt-in bfloat16
inference (``--bf16``) runs on AMX tile registers where the CPU has them (Intel Sapphire Rapids and later; the
process asks Linux for them once), else on AVX512-BF16 (``CRD_JAX_BF16_ENGINE=avx512`` or
:func:`set_bf16_engine` selects the latter).

Memory: each forward call asks the kernel for transparent huge pages on its output buffer before writing it
(``madvise``; a hint, ignored where THP is off, ``CRD_JAX_HUGEPAGES=0`` turns it off): a fresh
full-resolution output otherwise takes ~13,000 page faults per call.

Threads: one persistent pool per process, sized by the CPUs the process may use (its affinity mask, capped
by a cgroup CPU quota) or ``CRD_JAX_NUM_THREADS``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings
from importlib import metadata

import jax

from crd_jax.ops import native_build

_TARGETS = {
    "crd_conv_fwd": "CrdConvFwd",
    "crd_conv_upcat_fwd": "CrdConvUpcatFwd",
    "crd_conv_wgrad": "CrdConvWgrad",
    "crd_conv_pooled_t": "CrdConvPooledT",
    "crd_conv_wgrad_upcat": "CrdConvWgradUpcat",
    "crd_warp": "CrdWarp",
    "crd_warp_grad": "CrdWarpGrad",
    "crd_warp_linear": "CrdWarpLinear",
    "crd_ncc_fwd": "CrdNccFwd",
    "crd_ncc_bwd": "CrdNccBwd",
    "crd_grad_l2_fwd": "CrdGradL2Fwd",
    "crd_grad_l2_coarse": "CrdGradL2Coarse",
    "crd_upsample_linear": "CrdUpsampleLinear",
    "crd_upsample_linear_t": "CrdUpsampleLinearT",
}

_lock = threading.Lock()
_state: dict = {}
_REBUILD = "run `crd-jax build-kernel` to rebuild it"


class _Unusable(Exception):
    """Why the installed kernel cannot be used (the text of the one warning)."""


def _open_library() -> ctypes.CDLL:
    """The installed kernel, if it was built for the running jaxlib and from the sources on disk."""
    path = native_build.library_path()
    if path is None:
        raise _Unusable(
            "the native kernel was not built when crd-jax was installed (no C++ compiler?); "
            "run `crd-jax build-kernel` to build it"
        )
    lib = ctypes.CDLL(str(path))
    record = {}
    for name in ("crd_built_for_jaxlib", "crd_source_hash"):
        fn = getattr(lib, name, None)  # absent in libraries built before they were recorded
        if fn is not None:
            fn.restype = ctypes.c_char_p
        record[name] = fn().decode() if fn is not None else ""
    running = metadata.version("jaxlib")
    if record["crd_built_for_jaxlib"] != running:
        built = record["crd_built_for_jaxlib"] or "an older crd-jax"
        raise _Unusable(f"the native kernel was built for jaxlib {built}, this is jaxlib {running}; {_REBUILD}")
    on_disk = native_build.source_hash()
    if on_disk and record["crd_source_hash"] != on_disk:  # sources present and edited since the build
        raise _Unusable(f"the kernel's sources changed since it was built; {_REBUILD}")
    _state["built"] = f"jaxlib {running}"
    return lib


def _load() -> bool:
    if os.environ.get("CRD_JAX_FAST_CONV", "1") == "0":
        return False
    if not native_build.supported_platform(platform.system(), platform.machine()):
        return False
    lib = _open_library()
    if not lib.crd_cpu_supported():
        return False
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _state["lib"] = lib
    chosen = os.environ.get("CRD_JAX_WGRAD")
    if chosen is not None and chosen not in _WGRAD_NAMES:  # the library keeps the blocked kernel for it
        warnings.warn(f"crd_jax: CRD_JAX_WGRAD={chosen!r} is not one of {', '.join(_WGRAD_NAMES)}; using 'blocked'", stacklevel=3)
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
    if not native_build.supported_platform(platform.system(), platform.machine()):
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    return "the CPU lacks AVX2/FMA"


def in_use(chosen: str, fallback: str) -> str:
    """An op's formulation as it runs: ``fallback`` (the XLA reference's name) where ``chosen`` is ``"native"`` and
    the kernels are off (the op settings' getters report this, not the wish)."""
    return fallback if chosen == "native" and not available() else chosen


def threads() -> int:
    """Threads the native kernel uses (0 when it is not in use)."""
    return int(_state["lib"].crd_num_threads()) if available() else 0


_ISA_NAMES = {0: "avx2", 1: "avx512"}


def has_bf16() -> bool:
    """True when the native kernel runs and the CPU has AVX512-BF16 (the opt-in bfloat16 inference path)."""
    return available() and bool(_state["lib"].crd_has_bf16())


def bf16_speedup() -> float:
    """Multiply-adds per second of the bfloat16 engine in use over float32 FMAs on this CPU, measured once per
    process and engine (~20 ms). AVX512-BF16 (VDPBF16PS): up to 2 where it issues as often as an FMA, 0.50
    measured on an Intel Sapphire Rapids-class Xeon; AMX: ~16 on that Xeon. 0 where the native kernel or
    AVX512-BF16 is missing."""
    if not has_bf16():
        return 0.0
    key = "bf16_speedup_" + bf16_engine()
    if key not in _state:
        lib = _state["lib"]
        lib.crd_bf16_speedup.restype = ctypes.c_double
        _state[key] = float(lib.crd_bf16_speedup())
    return _state[key]


_BF16_ENGINES = {0: "avx512-bf16", 1: "amx"}


def bf16_engine() -> str:
    """What runs the bfloat16 tiles: ``"amx"`` (tile registers) or ``"avx512-bf16"`` (VDPBF16PS); "" without
    AVX512-BF16 or the native kernel."""
    return _BF16_ENGINES[int(_state["lib"].crd_bf16_engine())] if has_bf16() else ""


def describe_bf16() -> str:
    """The engine of ``--bf16`` in words, for logs and results files ("" where there is none)."""
    return {"amx": "AMX tiles", "avx512-bf16": "AVX512-BF16"}.get(bf16_engine(), "")


def set_bf16_engine(name: str) -> str:
    """Selects the engine of the bfloat16 tiles for this process (tests and benchmarks compare the two; the
    environment's ``CRD_JAX_BF16_ENGINE=avx512`` selects VDPBF16PS). AMX is refused where the CPU or the
    operating system lacks it; the engine in use is returned."""
    if name not in _BF16_ENGINES.values():
        raise ValueError(f"engine must be one of {sorted(_BF16_ENGINES.values())}, not {name!r}")
    if not has_bf16():
        return ""
    return _BF16_ENGINES[int(_state["lib"].crd_set_bf16_engine(1 if name == "amx" else 0))]


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


def winograd() -> bool:
    """True when the stride-1 3^3 layers with output channels in multiples of 16 (and at least
    :func:`winograd_min_input_channels` input channels) run as Winograd
    F(2x2x2, 3x3x3) (AVX-512, float32; ``csrc/winograd.h``): on by default, ``CRD_JAX_WINOGRAD=0`` or
    :func:`set_winograd` keeps the direct kernel."""
    return available() and isa() == "avx512" and bool(_state["lib"].crd_winograd())


def set_winograd(on: bool) -> bool:
    """Turns the Winograd path on or off for this process (tests and benchmarks compare the two); returns
    :func:`winograd`."""
    if available():
        _state["lib"].crd_set_winograd(1 if on else 0)
    return winograd()


def winograd_min_input_channels() -> int:
    """The fewest input channels of a layer that takes the Winograd path (8 by default, or
    ``CRD_JAX_WINOGRAD_MIN_CHANNELS`` at start-up: with fewer, its tile transforms cost more than the multiply-adds
    it saves; ``benchmarks/winograd_channels.py``); 0 when the kernel is unused."""
    return int(_state["lib"].crd_winograd_min_input_channels()) if available() else 0


def set_winograd_min_input_channels(channels: int) -> int:
    """Sets :func:`winograd_min_input_channels` for this process (1: wherever the path applies; tests and
    benchmarks compare the two paths on layers of few channels); read at run time, so compiled functions follow
    it. Returns the value in force."""
    if available():
        _state["lib"].crd_set_winograd_min_input_channels(int(channels))
    return winograd_min_input_channels()


_WGRAD_NAMES = ("rows", "blocked", "winograd", "auto")


def wgrad() -> str:
    """The weight gradient's kernel: ``"auto"`` (the default: the Winograd-domain kernel,
    ``csrc/conv_wgrad_winograd_avx512.cc``, on the AVX-512 stride-1 3^3 layers where it measured faster, the
    blocked one elsewhere), ``"winograd"`` (wherever it applies), ``"blocked"`` (``csrc/wgrad_blocked.h``, at the
    width of :func:`isa`) or ``"rows"`` (the earlier AVX2 kernel); ``CRD_JAX_WGRAD`` sets it at start-up.
    "" when the kernel is unused."""
    return _WGRAD_NAMES[int(_state["lib"].crd_wgrad())] if available() else ""


def set_wgrad(name: str) -> str:
    """Selects the weight-gradient kernel for this process (tests and benchmarks compare them in one process);
    read at run time, so compiled functions follow it. Returns :func:`wgrad`."""
    if name not in _WGRAD_NAMES:
        raise ValueError(f"wgrad kernel must be one of {', '.join(_WGRAD_NAMES)}, not {name!r}")
    if available():
        _state["lib"].crd_set_wgrad(_WGRAD_NAMES.index(name))
    return wgrad()


def winograd_wgrad_calls() -> int:
    """How many weight gradients of this process took the Winograd path (tests check the dispatch with it)."""
    if not available():
        return 0
    _state["lib"].crd_winograd_wgrad_calls.restype = ctypes.c_int64
    return int(_state["lib"].crd_winograd_wgrad_calls())


def winograd_calls() -> int:
    """How many convolutions of this process took the Winograd path (tests check the dispatch with it)."""
    if not available():
        return 0
    _state["lib"].crd_winograd_calls.restype = ctypes.c_int64
    return int(_state["lib"].crd_winograd_calls())


def describe() -> str:
    """Which convolution path this process runs, for logs, results files and ``crd-jax --version``."""
    if available():
        width = "AVX-512" if isa() == "avx512" else "AVX2/FMA"
        if winograd():
            width += " + Winograd"
        return f"native CPU kernel ({width}, {threads()} threads, {_state['built']})"
    return f"lax.conv ({_state.get('why', 'native kernel unavailable')})"
