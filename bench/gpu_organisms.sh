#!/usr/bin/env bash
# On the GPU machine (torch present, no network): install the carried wheels (bench/gpu_wheels.sh made them), then
# train and judge the organism variants of bench/gpu_organisms.py (training bounded by --max-seconds, if given).
# Writes under $OUT (or ./gpu_organisms_out): the table and log, and gpu_organisms.tar.part-*: each variant's
# shippable weights, manifest, result, validation curve and log, gpu_organisms.json.
#   bash bench/gpu_organisms.sh [extra gpu_organisms.py options, e.g. --variants receiver-6x192 sender-4x96]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh gpu_organisms
run="$(mktemp -d)/gpu_organisms"  # a new folder each time: nothing cached is reused
status=0
"$py" bench/gpu_organisms.py --out "$run" "$@" 2>&1 | tee "$out/gpu_organisms.log" || status=$?
cp "$run/gpu_organisms.md" "$out/" || true
# Everything but the cache (the trained organisms' exports duplicate the shippable weights), as one tar cut in 15 MiB
# parts: the device returns at most 8 files of at most 16 MiB. Rejoin: cat gpu_organisms.tar.part-* | tar -x
tar -C "$run" --exclude=./cache -cf - . | split -b 15M - "$out/gpu_organisms.tar.part-"
exit $status
