#!/usr/bin/env bash
# Multi-core check of preprocessing (issue 4) for the 16-core device machine (no GPU needed):
# the prep benchmark on 1 thread and all cores vs the Python path, and peak RSS 1x vs 10x.
# The 2-core dev VM cannot show thread scaling (its cores are shared), this machine can.
# Usage: scripts/device_check_prep.sh [python]   (about 2 minutes; prints JSON last)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PY:-python}}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
"$PY" -m sftfast.bench prep --json --conversations 40000 --scale 10 --threads 1,2,4,8,all
