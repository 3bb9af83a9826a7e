#!/usr/bin/env bash
# One device call for a session lent a GPU: the GPU check first (bounded), then the organism search of issue 19 in
# the time left. Both install the carried wheels (bench/gpu_wheels.sh made them; once per machine). Everything comes
# back under $OUT in at most 8 files: gpu_check.json/.log, gpu_organisms.md/.log, gpu_organisms.tar.part-*.
#   [GPU_CHECK_ARGS="--steps 100 --skip paper"] [GPU_ORGANISMS_ARGS="--variants ..."] \
#     bash bench/gpu_session.sh [SECONDS [CHECK_SECONDS [--dry-run]]]
# Defaults: 585 and 200 (inside one call's 600 s), GPU_CHECK_ARGS "--steps 100". On the H200 (2026-12-04) the check
# took 215 s with the paper protocol, of which the paper runs 118 s; the organisms' setup, decoding and packing 45 s.
set -uo pipefail
cd "$(dirname "$0")/.."
total="${1:-585}"
check="${2:-200}"
start=$SECONDS
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of options
GPU_CHECK_SECONDS="$check" bash bench/gpu_check.sh ${GPU_CHECK_ARGS:---steps 100} "${@:3}" ||
  echo "[gpu_session] gpu_check: exit $?"
left=$((total - (SECONDS - start) - 70))  # imports, 200k questions, decoding, packing: 45 s measured, and a margin
echo "[gpu_session] gpu_check took $((SECONDS - start)) s; organisms train for at most $left s"
# shellcheck disable=SC2086  # GPU_ORGANISMS_ARGS is a list of options
bash bench/gpu_organisms.sh --max-seconds "$left" ${GPU_ORGANISMS_ARGS:-} "${@:3}"
