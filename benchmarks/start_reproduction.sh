#!/usr/bin/env bash
# Starts (or resumes) the long 3-D LPBA40 reproduction in the background, outside the work tree.
# Run at the start of every session; `python benchmarks/reproduce.py --setting 3d-ll --status` shows progress.
# `benchmarks/start_reproduction.sh 3d-ll-rep` starts the CRD-vs-control replicates (configs/lpba40_vm_3d_ll_replicates.py),
# `... 3d-ll-long` the longer-budget CRD stages (configs/lpba40_vm_3d_ll_long.py).
# A run folder that was lost simply starts again from scratch (budget about 4 hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${CRD_RUNS:-$HOME/crd-runs}"
SETTING="${1:-3d-ll}"
mkdir -p "$RUNS"
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e .
fi
PY="${PYTHON:-.venv/bin/python}"
if pgrep -f "benchmarks/reproduce.py --setting $SETTING" > /dev/null; then
    echo "already running: $(pgrep -af "benchmarks/reproduce.py --setting $SETTING" | head -1)"
    exit 0
fi
EXTRA=()
# the variants of 3d-ll reuse the main run's finished stages; if that run's folder is gone, its VM-H and VM-LL as
# shipped in the package (the same parameters)
case "$SETTING" in 3d-ll-*)
    if [ -d "$RUNS/reproduce_lpba40_3d-ll" ]; then EXTRA=(--reuse "$RUNS/reproduce_lpba40_3d-ll"); else EXTRA=(--reuse-shipped); fi ;;
esac
nohup setsid "$PY" benchmarks/reproduce.py --setting "$SETTING" --no-full-size "${EXTRA[@]}" >> "$RUNS/reproduce_$SETTING.log" 2>&1 &
echo "started pid $! -> $RUNS/reproduce_$SETTING.log"
