#!/usr/bin/env bash
# Experiment 2 (128^3, n = 2) on a lent GPU, time-boxed and resumable across lends (benchmarks/gpu_science.py).
#
# Before the lend, here:  python benchmarks/gpu_science_data.py --data-root DIR    (-> .gpu_science/data, ~20 MB)
#                         bash benchmarks/device_wheels.sh                         (-> .whl)
# The lend (device tool): run  bash benchmarks/gpu_science.sh --limit 540   carry [".gpu_science", ".whl"]
# After it:               cp <returned files>/state.tar.gz* .gpu_science/state/   (the next lend resumes there)
# Dry run on CPU:         bash benchmarks/gpu_science.sh --small --limit 120
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=0
GS="${GPU_SCIENCE_DIR:-.gpu_science}"  # prepared data and carried state (git-ignored)
for a in "$@"; do [ "$a" = "--small" ] && SMALL=1; done
OUT_DIR="${OUT:-/tmp/gpu_science_out}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$SMALL" = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ "$SMALL" = 1 ] && PY=.venv/bin/python
if [ "$SMALL" = 1 ]; then
    DATA="$GS/small"
    [ -d "$DATA/images" ] || "$PY" benchmarks/gpu_science_data.py --small --dest "$DATA"
    set -- "$@" --data "$DATA" --state "$GS/small_state"
else
    set -- "$@" --data "$GS/data" --state "$GS/state"
fi
mkdir -p "$OUT_DIR"
set -o pipefail
"$PY" benchmarks/gpu_science.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt" | tail -n 40
if [ "$SMALL" = 1 ]; then  # the dry run plays the next lend's carry: its state goes where the next call reads it
    rm -rf "$GS/small_state" && mkdir -p "$GS/small_state" && cp "$OUT_DIR"/state.tar.gz* "$GS/small_state/"
fi
