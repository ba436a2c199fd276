#!/usr/bin/env bash
# GPU checks of the data plane (issue 3), for a machine with CUDA and the project's venv:
#   1. the loader's pinned-memory ring + non_blocking copies give the same batches as CPU,
#      even when the "training step" is slow (tests/test_dataloader.py::test_cuda_pinned_non_blocking);
#   2. the data benchmark with batches delivered to the GPU (tokens/s includes the H2D copy).
# Usage: scripts/gpu_check_data.sh [python]   (about a minute; prints JSON last)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PY:-python}}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA here"; print(torch.cuda.get_device_name(0))'
"$PY" -m pytest -q tests/test_dataloader.py -k cuda
"$PY" -m sftfast.bench data --json --n 2000 --repeat 3 --device cuda
