#!/usr/bin/env bash
# On the GPU machine (torch present, no network): install the carried wheels (bench/gpu_wheels.sh made them) into a
# private folder, then run bench/gpu_check.py. Writes under $OUT (or ./gpu_check_out): the runs, gpu_check.json, log.
#   bash bench/gpu_check.sh [extra gpu_check.py options, e.g. --steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"  # the dry run here: PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run="$(mktemp -d)/gpu_check"  # a new folder each time: nothing resumed, caches cold
"$py" bench/gpu_check.py --data-dir .gpu/data --out "$run" "$@" 2>&1 | tee "$out/log"
cp "$run/gpu_check.json" "$out/"
