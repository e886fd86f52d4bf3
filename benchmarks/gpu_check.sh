#!/usr/bin/env bash
# The GPU check (under 8 minutes on one GPU): CUDA equality tests, throughput of the paper's
# TFIM model at L = 10, 12 with 1,024 / 8,192 samples, and 200 steps of 10x10 training.
#   benchmarks/gpu_check.sh            on a CUDA machine (writes benchmarks/results/gpu.md)
#   benchmarks/gpu_check.sh --dry-run  every check at tiny sizes on the CPU (in the default suite)
# One summary line per check; exit 1 if any failed. Details: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${NAQS_PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    echo "gpu_check: $PYTHON not found; run 'make install' first (or set NAQS_PYTHON)" >&2
    exit 2
fi
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
