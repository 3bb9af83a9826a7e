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
# wandb and the part of its closure the image lacks: without wandb, jsonargparse cannot resolve the configs'
# WandbLogger init_args (job_type goes to wandb.init), so every config that names the logger fails to parse.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 jsonargparse==4.48.0 docstring_parser==0.18.0 typeshed_client==2.15.0 omegaconf==2.4.0 \
  wandb==0.31.0 protobuf==7.36.2 platformdirs==4.14.9 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
  typing_inspection==0.4.5 sniffio==1.3.1 distro==1.9.0 cwevals==0.0.1b1 googleapis_common_protos==1.76.0 \
  opentelemetry_api==1.45.2 \
  opentelemetry_sdk==1.45.2 opentelemetry_semantic_conventions==0.66b2 opentelemetry_proto==1.45.2 \
  opentelemetry_exporter_otlp_proto_common==1.45.2 opentelemetry_exporter_otlp_proto_http==1.45.2 \
  opentelemetry_exporter_http_transport==0.66b2 opentelemetry_exporter_otlp_common==0.66b2
cp "$data/clean_eval.jsonl" .gpu/data/
du -sh .whl .gpu
