#!/usr/bin/env bash
# GPU check of generation (run by the lead on a CUDA machine, < 2 minutes):
#   bash scripts/gpu_generate_check.sh
# Prints JSON: tokens/s of the Engine with and without the KV cache for a nanochat d12-size
# model (depth 12, width 768, vocab 65536) in bf16, batch 8, 64-token prompt, 256 new tokens,
# plus the GPU engine tests (cached == recomputed generation on CUDA too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
$PY -m sftfast.bench generate --json --device cuda --depth 12 --width 768 --heads 6 --kv-heads 6 \
    --vocab-size 65536 --batch 8 --prompt-tokens 64 --new-tokens 256 --repeats 2 --dtype bfloat16
$PY -m sftfast.bench generate --json --device cuda --depth 12 --width 768 --heads 6 --kv-heads 6 \
    --vocab-size 65536 --batch 1 --prompt-tokens 64 --new-tokens 256 --repeats 2 --dtype bfloat16
$PY -m pytest -q tests/test_engine.py -k cuda
