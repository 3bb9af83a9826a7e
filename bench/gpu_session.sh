#!/usr/bin/env bash
# One device call for a session lent a GPU: the GPU check first (bounded), then the organism search of issue 19 in
# the time left. Both install the carried wheels (bench/gpu_wheels.sh made them; once per machine). Everything comes
# back under $OUT in at most 8 files: gpu_check.json/.log, gpu_organisms.md/.log, gpu_organisms.tar.part-*.
#   bash bench/gpu_session.sh [SECONDS [CHECK_SECONDS [--dry-run]]]   (defaults 580 and 200: inside one call's 600 s)
set -uo pipefail
cd "$(dirname "$0")/.."
total="${1:-580}"
check="${2:-200}"
start=$SECONDS
GPU_CHECK_SECONDS="$check" bash bench/gpu_check.sh --steps 100 "${@:3}" || echo "[gpu_session] gpu_check: exit $?"
# What the organisms need beside training: imports and 200k questions (~40 s), decoding 900 questions a variant,
# packing (~60 s), and a margin.
left=$((total - (SECONDS - start) - 130))
echo "[gpu_session] gpu_check took $((SECONDS - start)) s; organisms train for at most $left s"
bash bench/gpu_organisms.sh --max-seconds "$left" "${@:3}"
