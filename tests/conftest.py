import os

# Tests run on the CPU with float32, whatever machine runs them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# crd-jax's compilation and shape caches go to a folder of this test session, not the user's home. This folder and
# the XLA cache's below are removed when the session ends (pytest_unconfigure): every run left ~15 MB and ~70 MB.
# Only the process that made a folder removes it (xdist's workers inherit the variables, not the folders).
_SESSION_FOLDERS = []
if "CRD_JAX_CACHE_DIR" not in os.environ:
    import tempfile

    _SESSION_FOLDERS.append(tempfile.mkdtemp(prefix="crd-jax-test-cache-"))
    os.environ["CRD_JAX_CACHE_DIR"] = _SESSION_FOLDERS[-1]
# XLA's LLVM backend at optimisation level 0 for the tests' programs (and the commands they start, which inherit
# it): the tests' arrays are tiny, so compiling is most of their time; level 0 took test_training.py from 213 to
# 192 CPU seconds and test_models + test_losses from 60 to 48. The HLO passes (fusion, layout: where XLA decides what
# a program computes) run as always, and the native kernels are g++'s either way. CRD_JAX_TEST_XLA_OPT=default keeps
# XLA's own level (benchmarks and users run at it).
if os.environ.get("CRD_JAX_TEST_XLA_OPT", "0") != "default" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
# On a GPU, XLA's default float32 convolutions and products run on TF32-class tensor cores (about 3 significant
# digits), which the comparisons with numpy/scipy/lax references below are not meant to measure: the ops are
# checked at full float32 there, as on the CPU (where this setting changes nothing). Seen on an H200:
# test_conv's gradient checks against lax.conv failed at rtol 1e-4 under the default and pass under "highest".
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


def pytest_unconfigure(config):
    import shutil

    for folder in _SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shift_model(tmp_path_factory):
    """A VM-L model folder (the authors' layout) whose output is (nearly) the constant displacement
    (1.5, -0.5, 0.25) voxels: the flow head's kernel zeroed, its bias half of that on the half-size grid."""
    import jax.numpy as jnp

    from crd_jax.interop import official
    from crd_jax.models.build import model_from_spec
    from crd_jax.model_io import save_model

    arch = official.ARCHITECTURE | {"fusion": "paper", "teacher_align_corners": False}
    spec = {
        "kind": "registrar",
        "factor": 2,
        "architecture": arch,
        "label": "VM-L (test)",
        "stage": "test",
        "preprocessing": {"normalize": "minmax", "percentiles": [0.5, 99.5], "resample_shape": [], "multiple": 32, "ndim": 3},
    }
    model = model_from_spec(spec)
    x = jnp.zeros((1, 64, 64, 64, 1))
    params = model.init(jax.random.PRNGKey(0), x, x)
    params["flow"]["conv"]["kernel"] = jnp.zeros_like(params["flow"]["conv"]["kernel"])
    params["flow"]["conv"]["bias"] = jnp.asarray([0.75, -0.25, 0.125])  # on the half-size grid: times 2
    path = tmp_path_factory.mktemp("models") / "shift"
    save_model(path, params, spec)
    return path


@pytest.fixture
def upcat_mode():
    """``crd_jax.ops.conv.upcat_backward`` to set the decoder's backward mode in a test; restored after it."""
    import importlib

    conv = importlib.import_module("crd_jax.ops.conv")  # the module (crd_jax.ops.conv is also a function's name)
    before = conv.upcat_backward()
    yield conv.upcat_backward
    conv.upcat_backward(before)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The quick tier (``pytest -m "not slow"``) runs the first case of each parametrized test; its other cases
    are marked ``slow`` and run in the full suite (what CI runs). Runs before ``-m`` selects."""
    seen = set()
    for item in items:
        if getattr(item, "callspec", None) is None:
            continue
        key = (item.path, item.cls, item.originalname)
        if key in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(key)


# JAX's persistent compilation cache for the tests' own processes, in this session's folder (both xdist workers
# share it): many tests build the same networks and steps under new jit wrappers, which the in-memory cache
# cannot match; measured on test_training/test_models/test_losses/test_authors_variants: 16% less CPU time.
# CRD_JAX_TEST_XLA_CACHE=0 turns it off (to time compilation, or to rule the cache out of a failure).
# A fresh folder for each session (set once by the controller, inherited by the workers): entries left by an
# earlier session would turn first compilations into cache hits, which the trace-count tests would see.
if os.environ.get("CRD_JAX_TEST_XLA_CACHE", "1") != "0" and os.environ["CRD_JAX_CACHE_DIR"] != "off":
    if "CRD_JAX_TEST_XLA_DIR" not in os.environ:
        import tempfile

        _SESSION_FOLDERS.append(tempfile.mkdtemp(prefix="crd-jax-test-xla-"))
        os.environ["CRD_JAX_TEST_XLA_DIR"] = _SESSION_FOLDERS[-1]
    jax.config.update("jax_compilation_cache_dir", os.environ["CRD_JAX_TEST_XLA_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Every test ends with SIGINT's and SIGTERM's handlers as it found them: a test (or a command it runs in this
    process) that left SIGINT ignored would make a later test's Ctrl-C vanish (seen once in a full run: a register
    that should have been interrupted wrote everything and returned 0)."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
