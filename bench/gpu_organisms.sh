#!/usr/bin/env bash
# On the GPU machine (torch present, no network): install the carried wheels (bench/gpu_wheels.sh made them), then
# train and judge the organism variants of bench/gpu_organisms.py (about 8 minutes). Writes under $OUT (or
# ./gpu_organisms_out): each variant's shippable weights, manifest and result, gpu_organisms.json/.md, the logs.
#   bash bench/gpu_organisms.sh [extra gpu_organisms.py options, e.g. --variants receiver-6x192 sender-4x96]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh gpu_organisms
run="$(mktemp -d)/gpu_organisms"  # a new folder each time: nothing cached is reused
status=0
"$py" bench/gpu_organisms.py --out "$run" "$@" 2>&1 | tee "$out/log" || status=$?
# Everything but the cache (the trained organisms' exports duplicate the shippable weights).
tar -C "$run" --exclude=./cache -cf - . | tar -C "$out" -xf -
exit $status
