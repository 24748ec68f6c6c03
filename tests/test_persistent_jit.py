"""crd_jax.compile.persistent_jit: compiled programs kept on disk and loaded without tracing.

Each test checks the values against plain numpy (the function is a closed form) and counts traces with a
Python side effect in the function body (it runs only while JAX traces)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax import compile as cc


@pytest.fixture
def cache(tmp_path):
    before = cc._executables["folder"]
    cc.cache_executables(str(tmp_path))
    yield tmp_path
    cc.cache_executables(before)


TRACES = []


def scaled_head(x, n, scale=1.0):
    TRACES.append(n)
    return jnp.cumsum(x[:n]) * scale


def expected(x, n, scale):
    return np.cumsum(np.asarray(x, np.float64)[:n]) * scale


def fresh(context=""):
    """A new wrapper, as a new process would have (nothing compiled in memory)."""
    return cc.PersistentJit(scaled_head, static_argnums=1, static_argnames="scale", context=context)


def stored(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".exe")


def test_a_second_wrapper_loads_the_program_without_tracing(cache):
    x = jnp.arange(10, dtype=jnp.float32)
    TRACES.clear()
    np.testing.assert_allclose(fresh()(x, 4, scale=2.0), expected(x, 4, 2.0), rtol=1e-6)
    assert len(TRACES) == 1 and len(stored(cache)) == 1
    np.testing.assert_allclose(fresh()(x, 4, scale=2.0), expected(x, 4, 2.0), rtol=1e-6)
    np.testing.assert_allclose(fresh()(x + 1, 4, scale=2.0), expected(x + 1, 4, 2.0), rtol=1e-6)  # new values, same program
    assert len(TRACES) == 1 and len(stored(cache)) == 1


def test_shapes_static_values_and_context_each_make_their_own_program(cache):
    x = jnp.arange(11, dtype=jnp.float32)
    TRACES.clear()
    fresh()(x, 4, scale=2.0)
    fresh()(jnp.arange(12, dtype=jnp.float32), 4, scale=2.0)
    fresh()(x.astype(jnp.int32), 4, scale=2.0)
    fresh()(x, 5, scale=2.0)
    out = fresh()(x, 4, scale=3.0)
    fresh(context="another model")(x, 4, scale=2.0)
    np.testing.assert_allclose(out, expected(x, 4, 3.0), rtol=1e-6)
    assert len(TRACES) == 6 and len(stored(cache)) == 6


def test_an_unreadable_file_is_compiled_again_and_replaced(cache):
    x = jnp.arange(7, dtype=jnp.float32)
    fresh()(x, 3)
    (name,) = stored(cache)
    (cache / name).write_bytes(b"not a program")
    TRACES.clear()
    np.testing.assert_allclose(fresh()(x, 3), expected(x, 3, 1.0), rtol=1e-6)
    # twice where JAX's own cache is on in this process (the command-line tests turn it on): its copy is
    # not stored, the program is compiled once more under a fresh name
    traced = len(TRACES)
    assert traced in (1, 2) and (cache / name).stat().st_size > 100
    np.testing.assert_allclose(fresh()(x, 3), expected(x, 3, 1.0), rtol=1e-6)
    assert len(TRACES) == traced


def test_a_program_only_ever_taken_from_jax_s_own_cache_is_not_stored(cache, monkeypatch):
    hits = iter(range(100))
    monkeypatch.setattr(cc, "_persistent_cache_hits", lambda: next(hits))  # every compile "hits"
    x = jnp.arange(6, dtype=jnp.float32)
    np.testing.assert_allclose(fresh()(x, 3), expected(x, 3, 1.0), rtol=1e-6)
    assert stored(cache) == []


def test_inside_a_trace_off_or_with_an_address_it_is_plain_jit(cache):
    x = jnp.arange(6, dtype=jnp.float32)
    f = fresh()
    g = jax.grad(lambda v: jnp.sum(f(v, 3, scale=2.0)))(x)
    np.testing.assert_allclose(g, [6.0, 4.0, 2.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(jax.jit(lambda v: f(v, 3))(x), expected(x, 3, 1.0), rtol=1e-6)
    fresh(context="<object at 0x7f00>")(x, 3)
    assert stored(cache) == []
    cc.cache_executables(None)
    fresh()(x, 3)
    assert stored(cache) == []


def test_the_key_covers_the_convolution_settings_and_the_build(cache, monkeypatch):
    x = jnp.arange(8, dtype=jnp.float32)
    fresh()(x, 3)
    conv = sys.modules["crd_jax.ops.conv"]
    monkeypatch.setitem(conv._settings, "bf16", not conv.bf16_inference())
    fresh()(x, 3)
    assert len(stored(cache)) == 2
    monkeypatch.setattr(cc, "_fingerprint", lambda: "another build of the package")
    fresh()(x, 3)
    assert len(stored(cache)) == 3


@pytest.mark.slow
def test_arguments_on_another_device_take_the_plain_jit(tmp_path):
    code = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np
        from crd_jax import compile as cc
        cc.cache_executables({str(tmp_path)!r})
        double_sum = lambda x: jnp.cumsum(x) * 2.0
        cc.PersistentJit(double_sum)(jnp.arange(5.0))  # on the default device: stored
        x = jax.device_put(jnp.arange(5.0), jax.devices()[1])
        y = cc.PersistentJit(double_sum)(x)  # the same shapes, committed to the other device
        assert y.sharding.device_set == {{jax.devices()[1]}}, y.sharding
        np.testing.assert_allclose(y, np.cumsum(np.arange(5.0)) * 2.0)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(stored(tmp_path)) == 1


SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from crd_jax import compile as cc
    from crd_jax.registration.model import predict
    from crd_jax.registration.warping import warp_image
    from crd_jax.models.build import model_from_spec
    from crd_jax.interop.official import ARCHITECTURE
    from crd_jax.user_cache import enable_compilation_cache
    from crd_jax.ops import native
    enable_compilation_cache()  # as the command line does: JAX's cache and the stored programs
    spec = {"kind": "registrar", "factor": 2, "architecture": dict(ARCHITECTURE)}
    model = model_from_spec(spec)
    x = jnp.asarray(np.random.default_rng(0).random((1, 32, 32, 32, 1), np.float32))
    params = model.init(jax.random.PRNGKey(0), x, x * 0.5)
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: traces.append(name) if name.endswith("jaxpr_trace_duration") else None)
    disp = np.asarray(predict(model, params, x, x * 0.5))
    warped = np.asarray(warp_image(np.asarray(x)[0, ..., 0], disp[0]))
    np.save(sys.argv[2], np.concatenate([disp.ravel(), warped.ravel()]))
    print(len(traces), native.available())
""")


@pytest.mark.slow
def test_new_processes_run_the_stored_model_and_warp_without_tracing(tmp_path):
    """The real path, as the command line sets it up: the native convolution and warp (FFI targets registered
    before loading), a model's predictor keyed by its repr. The first process stores its programs; with them
    deleted but JAX's cache full, the programs JAX's cache supplies are not stored (stored, they would load and
    then fail when run): compiled again under a new name, they are, and the third process traces nothing.
    Every process gives the same bytes."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, CRD_JAX_CACHE_DIR=str(tmp_path / "user-cache"))
    exe = tmp_path / "user-cache" / "executables"

    def run(i):
        proc = subprocess.run(
            [sys.executable, str(script), "", str(tmp_path / f"out{i}.npy")],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}.npy"), np.load(tmp_path / "out0.npy"))
        return int(proc.stdout.split()[0])

    assert run(0) >= 2 and len(stored(exe)) == 2
    for p in exe.iterdir():
        p.unlink()
    assert run(1) >= 2 and len(stored(exe)) == 2  # compiled again under another name, and stored
    assert run(2) == 0
