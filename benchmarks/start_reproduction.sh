#!/usr/bin/env bash
# Starts (or resumes) the long 3-D LPBA40 reproduction in the background, outside the work tree.
# Run at the start of every session; `python benchmarks/reproduce.py --setting 3d-ll --status` shows progress.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${CRD_RUNS:-$HOME/crd-runs}"
SETTING="${1:-3d-ll}"
mkdir -p "$RUNS"
PY="${PYTHON:-.venv/bin/python}"
nohup setsid "$PY" benchmarks/reproduce.py --setting "$SETTING" --no-full-size >> "$RUNS/reproduce_$SETTING.log" 2>&1 &
echo "started pid $! -> $RUNS/reproduce_$SETTING.log"
