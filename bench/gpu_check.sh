#!/usr/bin/env bash
# On the GPU machine (torch present, no network): install the carried wheels (bench/gpu_wheels.sh made them) into a
# private folder, then run bench/gpu_check.py. Writes under $OUT (or ./gpu_check_out): gpu_check.json and gpu_check.log.
#   bash bench/gpu_check.sh [extra gpu_check.py options, e.g. --steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh gpu_check
tmp="$(mktemp -d)"
# Only gpu_check.json and the log come back (copied to $out below); the runs, caches and checkpoints are scratch, and
# left behind they would fill the disk that bench/gpu_session.sh's organisms step uses next.
trap 'rm -rf "$tmp"' EXIT
run="$tmp/gpu_check"  # a new folder each time: nothing resumed, caches cold
# bench/gpu_wheels.sh copies clean_eval.jsonl to .gpu/data for the GPU machine; a fresh clone (the CPU dry run) has
# only the shared folder it copies from. A check skipping the steps that read it needs neither: gpu_check.py decides.
data=.gpu/data
[ -d "$data" ] || data=../shared/data/multihop
# GPU_CHECK_SECONDS (0: none) bounds the check when it shares one call with other work (bench/gpu_session.sh); KILL
# follows TERM after 10 s, since Lightning catches TERM and goes on.
timeout -k 10 "${GPU_CHECK_SECONDS:-0}" "$py" bench/gpu_check.py --data-dir "$data" --out "$run" "$@" 2>&1 |
  tee "$out/gpu_check.log"
cp "$run/gpu_check.json" "$out/"
