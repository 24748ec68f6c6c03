"""Compilation helpers."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import os
import pickle
import platform
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax

# XLA's CPU backend spends ~0.5 s of LLVM optimisation on every threefry random draw (and ~2.5 s on a
# normal draw's erf_inv), so a network's parameter initialisation took ~18 s to compile on a 2-core
# machine. Code that runs once gains nothing from optimisation: compile it at level 0 (~2 s). The
# random bits are the same at every optimisation level.
_ONE_SHOT_OPTIONS = {"xla_backend_optimization_level": 0}

_state = threading.local()


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within the block, :func:`run_once` returns ``jax.ShapeDtypeStruct`` trees instead of computing.

    Parameter initialisation then costs a trace, not a compilation, so a whole multi-stage training plan
    (every model, every stage's initial parameters) can be built and its train steps checked with
    ``jax.eval_shape`` in seconds: a dry run of a config.
    """
    previous = getattr(_state, "abstract", False)
    _state.abstract = True
    try:
        yield
    finally:
        _state.abstract = previous


def run_once(fn: Callable, *args: Any) -> Any:
    """Compiles ``fn`` without backend optimisation and calls it on ``args`` (for init-like code)."""
    if getattr(_state, "abstract", False):
        return jax.eval_shape(fn, *args)
    jitted = jax.jit(fn)
    if jax.default_backend() != "cpu":
        return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=_ONE_SHOT_OPTIONS)(*args)


# --- compiled programs kept on disk -------------------------------------------------------------------------
#
# JAX's persistent compilation cache saves the XLA compilation, but every new process still traces and
# lowers each function to find its entry (~0.55 s of a ~2.9 s `crd-jax register` call on 2 cores). The
# executables below are stored whole (jax.experimental.serialize_executable) under a key that covers
# everything the program depends on, so a later process loads them without tracing.

_executables: dict = {"folder": None}


def cache_executables(folder: Optional[str]) -> None:
    """Stores and reuses the programs of :func:`persistent_jit` functions in ``folder`` (``None``: off, the
    default; the command line turns it on in its user cache).

    JAX's serialized executables are pickles (loading one can run code), so nothing is unpickled unless it
    is proven to be ours: the folder must be this user's and private (:func:`crd_jax.user_cache.private_folder`),
    an entry a regular file of this user that nobody else can write, and its content must carry a valid
    HMAC-SHA256 tag under a secret key kept in the folder (``.key``, 0600, created on first use). A planted,
    altered or damaged entry is ignored and compiled again."""
    from crd_jax.user_cache import private_folder

    key = None
    if folder is not None and private_folder(folder):
        key = _secret_key(folder)
    _executables["folder"] = folder if key is not None else None
    _executables["key"] = key


_MAGIC = b"crd-jax executable 2\n"
_TAG = 32  # bytes of an HMAC-SHA256 tag


def _secret_key(folder: str) -> Optional[bytes]:
    """The folder's 32-byte secret (``.key``, a private file of this user), created on first use."""
    import tempfile

    from crd_jax.user_cache import trusted_file

    path = os.path.join(folder, ".key")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            try:
                fd_tmp, tmp = tempfile.mkstemp(prefix=".key.", dir=folder)  # 0600
                with os.fdopen(fd_tmp, "wb") as f:
                    f.write(os.urandom(32))
                try:
                    os.link(tmp, path)  # never replaces a key another process made meanwhile
                except FileExistsError:
                    pass
                finally:
                    os.unlink(tmp)
            except OSError:
                return None
            continue
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not trusted_file(fd) or st.st_mode & 0o077:
                return None
            key = os.read(fd, 64)
        finally:
            os.close(fd)
        return key if len(key) == 32 else None
    return None


def _sign(key: bytes, body: bytes) -> bytes:
    import hmac

    return hmac.new(key, body, hashlib.sha256).digest()


def _read_entry(path: str, key: bytes) -> Optional[bytes]:
    """The body of a stored program if the entry is this user's, private and carries a valid tag; else ``None``."""
    import hmac

    from crd_jax.user_cache import trusted_file

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not trusted_file(fd):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            blob = f.read()
    except OSError:
        return None
    finally:
        os.close(fd)
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _TAG:
        return None
    tag, body = blob[len(_MAGIC) : len(_MAGIC) + _TAG], blob[len(_MAGIC) + _TAG :]
    return body if hmac.compare_digest(tag, _sign(key, body)) else None


def _write_entry(path: str, key: bytes, body: bytes) -> None:
    """Writes an entry whole (a private temporary file renamed into place)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".entry.", dir=os.path.dirname(path))  # 0600 whatever the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + _sign(key, body) + body)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def source_digest(*folders: str) -> str:
    """SHA-256 of crd-jax's Python and native sources (the package, or only its ``folders``, e.g. ``"models"``)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for top in [root / f for f in folders] or [root]:
        for path in sorted(top.rglob("*")):
            if path.suffix in (".py", ".cc", ".h") and path.is_file():
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _fingerprint() -> str:
    """What every stored program depends on besides its own arguments: this package's source (Python and
    native), JAX's version and backend, the host CPU (XLA:CPU compiles for its instruction set) and the
    compilation settings of the environment."""
    import jaxlib

    h = hashlib.sha256(source_digest().encode())
    device = jax.devices()[0]
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(l for l in itertools.islice(f, 40) if l.startswith(("model name", "flags")))
    except OSError:
        cpu = platform.processor()
    for part in (
        jax.__version__,
        jaxlib.__version__,
        device.platform,
        device.device_kind,
        getattr(device.client, "platform_version", ""),
        cpu,
        os.environ.get("XLA_FLAGS", ""),
        str(jax.config.jax_enable_x64),
        str(jax.config.jax_default_matmul_precision),
    ):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()


def _trace_settings() -> str:
    """Process settings that change what a function traces to: the native convolution's presence, the opt-in
    bfloat16 inference convolutions, the per-process formulations of the ops (native kernel or XLA reference;
    a process that asked for a reference must not be handed a stored native program) and the kernel settings a
    trace reads (instruction set, Winograd, weight-gradient kernel: which custom calls the decoder's backward
    makes; a stored program still runs under other settings, through the kernels' fallbacks, but slower). (Asking for the first also
    registers the native kernels' FFI targets, which a stored program that calls them needs before it can be
    loaded.)"""
    import importlib

    conv, native, spatial, ncc, grad_l2 = (
        importlib.import_module(f"crd_jax.ops.{m}") for m in ("conv", "native", "spatial", "ncc", "grad_l2")
    )  # crd_jax.ops.conv is also a function
    return (
        f"native={native.available()} bf16={conv.bf16_inference()} upsample={spatial.upsample_vjp()} "
        f"warp={spatial.warp_gradient()} ncc={ncc.ncc_formulation()} grad_l2={grad_l2.grad_l2_formulation()} "
        f"upcat={conv.upcat_backward()} isa={native.isa()} winograd={native.winograd()} wgrad={native.wgrad()}"
    )


_hits = threading.local()


def _count_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits.n = getattr(_hits, "n", 0) + 1


@functools.lru_cache(maxsize=None)
def _listen_for_cache_hits() -> None:
    jax.monitoring.register_event_listener(_count_cache_hit)


def _persistent_cache_hits() -> int:
    """Programs this thread has taken from JAX's persistent compilation cache so far."""
    _listen_for_cache_hits()
    return getattr(_hits, "n", 0)


def _on_the_default_device(leaves) -> bool:
    """Concrete arguments of a single-process run, each on the default device or not yet on any: what a stored
    program is compiled for (tracers, other devices and multi-process runs take the plain ``jax.jit``)."""
    if jax.process_count() > 1:
        return False
    default = jax.devices()[0]
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            return False
        if isinstance(x, jax.Array) and x.sharding.device_set != {default}:
            return False
    return True


class PersistentJit:
    """``jax.jit(fun, static_argnums, static_argnames)`` whose compiled programs also outlive the process
    (:func:`cache_executables`). ``context``: a description of what ``fun`` closes over (a model's repr);
    a description holding a memory address (``0x...``) would never match again, so it is not stored.

    Inside another trace, away from the CPU, with arguments on other devices or processes, or with the cache
    off, it is the plain ``jax.jit`` function: one per set of the process's trace settings
    (:func:`_trace_settings`), since ``jax.jit``'s own cache does not see them (a function traced under
    ``bf16_inference(True)`` must not be reused after it is turned off, nor the other way round)."""

    def __init__(
        self,
        fun: Callable,
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        context: str = "",
    ):
        functools.update_wrapper(self, fun)
        static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        names = list(inspect.signature(fun).parameters)
        self._static_positions = set(static_argnums) | {names.index(n) for n in static_argnames if n in names}
        self._static_names = set(static_argnames) | {names[i] for i in static_argnums if i < len(names)}
        self._what = f"{fun.__module__}.{fun.__qualname__}|{context}"
        self._programs: dict = {}
        self._jits: dict = {}  # trace settings -> the plain jitted function traced under them

    @property
    def _jit(self):
        settings = _trace_settings()
        jitted = self._jits.get(settings)
        if jitted is None:
            fun = self.__wrapped__

            # a new function object per settings: jax.jit caches traces by the function, across its wrappers
            @functools.wraps(fun)
            def traced(*args, **kwargs):
                return fun(*args, **kwargs)

            # both given in full: jax.jit infers one from the other only when the other is left out
            jitted = self._jits[settings] = jax.jit(
                traced, static_argnums=sorted(self._static_positions), static_argnames=sorted(self._static_names)
            )
        return jitted

    def __call__(self, *args, **kwargs):
        folder = _executables["folder"]
        dynamic = [a for i, a in enumerate(args) if i not in self._static_positions]
        dynamic_kw = {k: v for k, v in kwargs.items() if k not in self._static_names}
        leaves, tree = jax.tree.flatten((dynamic, dynamic_kw))
        if folder is None or jax.default_backend() != "cpu" or not _on_the_default_device(leaves):
            return self._jit(*args, **kwargs)
        static = (
            [(i, a) for i, a in enumerate(args) if i in self._static_positions],
            sorted((k, v) for k, v in kwargs.items() if k in self._static_names),
        )
        description = repr((self._what, static, str(tree), [jax.typeof(x) for x in leaves], _trace_settings()))
        if "0x" in description:
            return self._jit(*args, **kwargs)
        key = hashlib.sha256((_fingerprint() + description).encode()).hexdigest()
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._load_or_compile(folder, key, args, kwargs)
        return program(*dynamic, **dynamic_kw)

    def __getattr__(self, name):  # lower, trace, eval_shape, ...: those of the plain jitted function
        if name.startswith("_"):  # not set yet (during __init__) or private: no recursion through _jit
            raise AttributeError(name)
        return getattr(self._jit, name)

    def _named_jit(self, key: str):
        """The function under a name that carries its key here: JAX's compilation cache keys on the lowered
        module, name included, so a program missing here is normally missing there too."""
        fun = self.__wrapped__

        @functools.wraps(fun)
        def named(*args, **kwargs):
            return fun(*args, **kwargs)

        named.__name__ = f"{fun.__name__}_{key[:16]}{key[64:]}"
        return jax.jit(named, static_argnums=sorted(self._static_positions), static_argnames=sorted(self._static_names))

    def _compile(self, name: str, args, kwargs):
        """``(program, fresh)``: compiled under ``name``; ``fresh`` unless JAX's own cache supplied it."""
        hits = _persistent_cache_hits()
        program = self._named_jit(name).lower(*args, **kwargs).compile()
        return program, _persistent_cache_hits() == hits

    def _load_or_compile(self, folder: str, key: str, args, kwargs):
        from jax.experimental import serialize_executable

        path = os.path.join(folder, f"{key}.exe")
        secret = _executables.get("key")
        body = _read_entry(path, secret) if secret is not None and os.path.exists(path) else None
        if body is not None:  # ours, untouched since we wrote it: only then unpickled
            try:
                payload, in_tree, out_tree = pickle.loads(body)
                return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            except Exception:  # from another build: compile it again and replace it
                pass
        program, fresh = self._compile(key, args, kwargs)
        if not fresh:
            # taken from JAX's own compilation cache (this folder lost its copy): XLA:CPU serializes such an
            # executable without its fused kernels (it loads, then fails when run). Compiled once more under
            # a name JAX's cache has never seen, it can be stored.
            program, fresh = self._compile(f"{key}_{os.urandom(6).hex()}", args, kwargs)
            if not fresh:
                return program
        try:  # whole or absent: concurrent processes may write the same key
            if secret is not None:
                _write_entry(path, secret, pickle.dumps(serialize_executable.serialize(program)))
        except Exception:  # a cache only saves time: never a reason to fail
            pass
        return program


def persistent_jit(
    fun: Optional[Callable] = None,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    context: str = "",
) -> PersistentJit | Callable[[Callable], PersistentJit]:
    """Decorator form of :class:`PersistentJit` (``@persistent_jit`` or ``@persistent_jit(static_argnums=...)``)."""
    if fun is None:
        return lambda f: PersistentJit(f, static_argnums, static_argnames, context)
    return PersistentJit(fun, static_argnums, static_argnames, context)
