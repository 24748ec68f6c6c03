import os

# Tests run on the CPU with float32, whatever machine runs them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# crd-jax's compilation and shape caches go to a folder of this test session, not the user's home.
if "CRD_JAX_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["CRD_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="crd-jax-test-cache-")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
