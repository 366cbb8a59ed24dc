#!/usr/bin/env bash
# The GPU readiness check in one command (issue 14): on a machine with a GPU, about ten minutes,
# one JSON file (default results/gpu_check.json). Options go to scripts/gpu_check.py:
#   scripts/gpu_check.sh [--out FILE] [--config FILE] [--budget-seconds S] [--stages a,b] [--cpu-dry-run]
# docs/gpu_readiness.md says what each stage measures and where to record the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
