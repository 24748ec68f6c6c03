"""The test session's cache folders (tests/conftest.py: crd-jax's and XLA's) are removed when the session ends: a
pytest run in a fresh process, with its own temporary folder, leaves no crd-jax-test-* folder behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("CRD_JAX_SESSION_CACHE_PROBE") != "1", reason="runs inside the test below")
def test_inner_session_has_its_cache_folder():
    cache = Path(os.environ["CRD_JAX_CACHE_DIR"])
    assert cache.is_dir() and cache.name.startswith("crd-jax-test-cache-")
    assert cache.parent == Path(os.environ["TMPDIR"])
    (cache / "written-by-the-session").write_text("x")
    xla = Path(os.environ["CRD_JAX_TEST_XLA_DIR"])
    assert xla.is_dir() and xla.parent == cache.parent


def test_a_test_session_removes_its_cache_folders(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("CRD_JAX_CACHE_DIR", "CRD_JAX_TEST_XLA_DIR", "CRD_JAX_TEST_XLA_CACHE")
    }
    env.update(TMPDIR=str(tmp), CRD_JAX_SESSION_CACHE_PROBE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_inner_session_has_its_cache_folder"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(tmp.glob("crd-jax-test-*"))
