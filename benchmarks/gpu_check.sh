#!/usr/bin/env bash
# One command for the day a GPU is lent (see benchmarks/gpu_check.py):
#   bash benchmarks/gpu_check.sh            GPU tests + every benchmark group, results under benchmarks/results/
#   bash benchmarks/gpu_check.sh --dry-run  collect every group without a GPU and check none is missing
# Runs from the source tree (PYTHONPATH=.), downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/gpu_check.py "$@"
