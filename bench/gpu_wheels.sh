#!/usr/bin/env bash
# Prepare what bench/gpu_check.sh needs on a GPU machine that has torch but no network: the project's dependencies
# that such an image (e.g. torch + pytorch-lightning + transformers 5.17) lacks or has below our ranges, as wheels in
# .whl/, and the paper's clean_eval file in .gpu/data/ (both git-ignored; carry them with the tree, ~15 MiB).
#   bash bench/gpu_wheels.sh [SHARED_DATA_DIR]    (default ../shared/data/multihop)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/multihop}"
rm -rf .whl && mkdir -p .whl .gpu/data
# The versions verified together here (pyproject ranges); --no-deps: the rest is in the image (huggingface_hub >= 1.31,
# tokenizers 0.23, safetensors 0.8, pytorch-lightning 2.6, torchmetrics, numpy, scipy, matplotlib, pyyaml, typer).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 jsonargparse==4.48.0 docstring_parser==0.18.0 typeshed_client==2.15.0 omegaconf==2.4.0
cp "$data/clean_eval.jsonl" .gpu/data/
du -sh .whl .gpu
