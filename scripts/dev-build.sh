#!/usr/bin/env bash
# Day-to-day build of the extension in this checkout, without reinstalling anything:
# builds sftfast._core (profile `fast`) and drops it into python/sftfast/, so that
#   PYTHONPATH=$PWD/python $VENV/bin/python -m pytest tests
# uses this checkout's code with the interpreter of any venv that has the dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(pwd)/.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "error: no Python at $PY: run 'make build' first (it creates .venv), or set PY=/path/to/venv/bin/python" >&2
    exit 1
fi
suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PYO3_PYTHON="$PY" cargo build --profile fast --features python --lib
cp target/fast/libsftfast.so "python/sftfast/_core$suffix"
echo "built python/sftfast/_core$suffix"
