#!/usr/bin/env bash
# GPU check on a CUDA machine, in under 5 minutes and installing nothing: trains 200 steps at 64x64,
# batch 128, bf16-mixed for the project and the classic-recipe reference, and prints images/s and
# peak GPU memory for each. Usage: bash benchmarks/gpu_check.sh [--data-dir DIR] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    PYTHON="$(command -v python3)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 300 "$PYTHON" -m benchmarks.gpu "$@"
