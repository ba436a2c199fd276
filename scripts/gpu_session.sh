#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent machine with a short time budget:
#   here:   bash scripts/device_wheels.sh 3.12        (once: the device's Python, see its README)
#   device: bash scripts/gpu_session.sh               (carrying .whl; results under $OUT)
# Steps in priority order; each runs only if its usual duration fits what is left of BUDGET
# (seconds, default 560), and is cut at what is left. Each step's output goes to
# $OUT/<step>.log (JSON results to $OUT/<step>.json where the check writes one); the summary
# (step, exit status, seconds) is printed at the end and kept in $OUT/summary.txt.
#   train    issue 6: d12 training step, tokens/s and MFU vs eager CE + Python data path (~200 s)
#   loss     issue 5: CUDA loss tests, then the benchmark vs eager/Liger/CCE, --quick, + a 32 MiB backward chunk row (~200 s)
#   data     issue 3: pinned-ring CUDA test + data benchmark to the GPU (loader: 1 core vs all, threads vs 1..N worker processes over a task) (~110 s)
#   model    issue 6: CUDA model tests (FlexAttention packed-row attention: forward and gradients) (~60 s)
#   generate issue 7: Engine tokens/s with/without KV cache, d12 bf16 (~90 s)
#   prep     issue 4: preprocessing thread scaling on the machine's cores (~120 s)
# STEPS="loss data" runs a subset, in that order.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$PWD/gpu_results}
BUDGET=${BUDGET:-560}
STEPS=${STEPS:-"train loss data model generate prep"}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

"$PY" scripts/device_setup.py --site /tmp/sftfast_site 2>&1 | tee "$OUT/setup.log"
setup_rc=${PIPESTATUS[0]}
export PYTHONPATH=$PWD/python:/tmp/sftfast_site${PYTHONPATH:+:$PYTHONPATH}
{
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")'
    ldd --version 2>&1 | head -1
    nproc
} 2>&1 | tee -a "$OUT/setup.log"
# Without a loadable, current extension every data and training check measures nothing useful:
# stop here rather than spend the machine's time.
if [ "$setup_rc" != 0 ] || ! "$PY" -c 'import sftfast; from sftfast import RenderedChunk; print("sftfast extension:", sftfast._core.__file__)' 2>&1 | tee -a "$OUT/setup.log"; then
    echo "setup failed (see $OUT/setup.log): no GPU check was run" | tee "$OUT/summary.txt"
    exit 1
fi

declare -A EST=([train]=200 [loss]=200 [data]=110 [model]=60 [generate]=90 [prep]=120)
summary=()
for step in $STEPS; do
    est=${EST[$step]:-60}
    l=$(left)
    if [ "$l" -lt "$est" ]; then
        summary+=("$step skipped ($l s left, needs ~$est)")
        continue
    fi
    t0=$(date +%s)
    case $step in
        train) cmd=("$PY" scripts/gpu_train_check.py --out "$OUT/train.json" --budget $((est < l - 15 ? est - 15 : l - 15))) ;;
        # DH_IN_DW=0: dH's fp32 accumulator on its own (the layout before 2026-11-28): what keeping
        # it in dW's last rows saves in memory (by arithmetic 128 MiB at shape 3) and costs in time
        # (recomputing ~2N columns' logits: +3-6% by arithmetic). CHUNK_MB=128: larger chunks.
        loss) cmd=("$PY" scripts/gpu_loss_check.py --quick --triton-config DH_IN_DW=0 --triton-config CHUNK_MB=128 --out "$OUT/loss.json") ;;
        data) cmd=(bash scripts/gpu_check_data.sh "$PY") ;;
        model) cmd=("$PY" -m pytest -q -p no:cacheprovider tests/test_model.py -k cuda) ;;
        generate) cmd=(bash -c "PY=$PY bash scripts/gpu_generate_check.sh") ;;
        prep) cmd=(bash scripts/device_check_prep.sh "$PY") ;;
        *) summary+=("$step unknown"); continue ;;
    esac
    echo "=== $step (up to $l s) ==="
    timeout --kill-after=5 "$l" "${cmd[@]}" >"$OUT/$step.log" 2>&1
    rc=$?
    tail -c 3000 "$OUT/$step.log"
    summary+=("$step rc=$rc $(($(date +%s) - t0)) s")
done
echo "=== summary (budget $BUDGET s, used $(($(date +%s) - START)) s) ===" | tee "$OUT/summary.txt"
printf '%s\n' "${summary[@]}" | tee -a "$OUT/summary.txt"
