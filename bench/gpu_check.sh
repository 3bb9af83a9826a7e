#!/usr/bin/env bash
# On the GPU machine (torch present, no network): install the carried wheels (bench/gpu_wheels.sh made them) into a
# private folder, then run bench/gpu_check.py. Writes under $OUT (or ./gpu_check_out): the runs, gpu_check.json, log.
#   bash bench/gpu_check.sh [extra gpu_check.py options, e.g. --steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh gpu_check
run="$(mktemp -d)/gpu_check"  # a new folder each time: nothing resumed, caches cold
"$py" bench/gpu_check.py --data-dir .gpu/data --out "$run" "$@" 2>&1 | tee "$out/log"
cp "$run/gpu_check.json" "$out/"
