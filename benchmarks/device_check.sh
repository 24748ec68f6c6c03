#!/usr/bin/env bash
# The GPU check of issue 14 in one command, <= 8 minutes on one H100: (a) the numeric tests on the GPU,
# (b) Table II for crd-jax's VM / VM-diff at H, L and LL at OASIS size (latency, peak device memory),
# (c) the same VM in PyTorch on the same GPU, (d) the native CPU kernel's scaling on the host's CPUs (16 on
# the device machines lent here). Tables and logs go to $OUT.
#
#   on the device machine, from the repository root:   bash benchmarks/device_check.sh
#   a dry run on a CPU (small sizes, slow):             OUT=/tmp/dc bash benchmarks/device_check.sh --small
#
# The device image has JAX 0.11, flax, optax, orbax, torch, but not nibabel, ml_collections or tensorboardX:
# carry them as wheels in .whl/ (benchmarks/device_wheels.sh fetches them) and they are installed first.
set -uo pipefail
SMALL=0
[ "${1:-}" = "--small" ] && SMALL=1
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/crd-site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/crd-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if [ $SMALL = 1 ]; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"; SHAPE="64 64 64"; REPEATS=2; TESTS="tests/test_fullres.py"
else
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"; SHAPE="160 192 224"; REPEATS=10
    TESTS="tests/test_spatial.py tests/test_sample_volume.py tests/test_losses.py tests/test_models.py tests/test_fullres.py tests/test_conv.py
           tests/test_metrics.py tests/test_augment.py tests/test_training.py::test_every_stage_loss_is_finite_and_decreases_on_a_fixed_pair_2d
           tests/test_training.py::test_distillation_loss_decreases_in_3d_and_teacher_stays_frozen"
fi
# One GPU, many test processes: the tests spend their time compiling (CPU work), 2-4 s each on an H200, which
# in one process ran past the limit (2026-11-28: 71 of ~190 tests in 250 s).
XDIST=""
if [ $SMALL = 0 ] && "$PY" -c "import xdist" > /dev/null 2>&1; then XDIST="-n ${TEST_WORKERS:-8}"; fi
start=$(date +%s)
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PYEOF'
import sys
import jax
print("python", sys.version.split()[0], "jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
except Exception as exc:
    print("torch unavailable:", exc)
import crd_jax.cli.main  # the package imports with what is installed
PYEOF
cat "$OUT/versions.txt"

# (a) the tests on the GPU (the conftest's JAX_PLATFORMS=cpu default is overridden above)
timeout "${TEST_LIMIT:-200}" "$PY" -m pytest -q -p no:cacheprovider -rfE $XDIST $TESTS > "$OUT/tests.txt" 2>&1
echo "pytest exit status $? after $(( $(date +%s) - start )) s" >> "$OUT/tests.txt"
tail -n 5 "$OUT/tests.txt"

# (b) + (c) Table II, crd-jax and PyTorch, one fresh process per row
timeout "${TABLE_LIMIT:-150}" "$PY" benchmarks/gpu_table.py --shape $SHAPE --repeats $REPEATS --out "$OUT/gpu_table" > "$OUT/gpu_table.log" 2>&1
echo "gpu_table exit status $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_table.log"
cat "$OUT/gpu_table.md" 2>/dev/null

# (d) the native kernel from 1 to all of the host's CPUs against their FMA peak (JAX on the CPU here)
CPU_ARGS="--repeats 3"; [ $SMALL = 1 ] && CPU_ARGS="--repeats 1 --shape 32 32 32 --seconds 0.2"
JAX_PLATFORMS=cpu timeout "${SCALING_LIMIT:-130}" "$PY" benchmarks/cpu_peak.py $CPU_ARGS --out "$OUT/cpu_peak" > "$OUT/cpu_peak.log" 2>&1
echo "cpu_peak exit status $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/cpu_peak.log"
cat "$OUT/cpu_peak.md" 2>/dev/null
