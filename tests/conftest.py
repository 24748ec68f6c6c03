import os

# Tests run on the CPU with float32, whatever machine runs them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# crd-jax's compilation and shape caches go to a folder of this test session, not the user's home.
if "CRD_JAX_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["CRD_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="crd-jax-test-cache-")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
# On a GPU, XLA's default float32 convolutions and products run on TF32-class tensor cores (about 3 significant
# digits), which the comparisons with numpy/scipy/lax references below are not meant to measure: the ops are
# checked at full float32 there, as on the CPU (where this setting changes nothing). Seen on an H200:
# test_conv's gradient checks against lax.conv failed at rtol 1e-4 under the default and pass under "highest".
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
