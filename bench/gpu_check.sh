#!/usr/bin/env bash
# One prepared check of dmlbench on a single-GPU machine, under 8 minutes; prints its figures and,
# when $OUT is set, also writes them to $OUT/gpu_check.txt.
#
#   a. the card (nvidia-smi), torch and CUDA versions
#   b. training throughput, ResNet-50 (random weights) at 224 px, batch 112: dmlbench's trainer vs
#      a bare bf16 PyTorch loop (bench/gpu_train_throughput.py; target >= 90 %)
#   c. fp32 evaluation of 60,502 x 512 (SOP-sized) on the GPU vs PML's AccuracyCalculator on the
#      GPU (bench/gpu_eval_check.py): c1 retrieval, c2 clustering (NMI/F1)
#   d. a 4-trial sweep with --gpus-per-trial 0.25 on CUDA, sampling nvidia-smi to show the trials
#      sharing the GPU (bench/gpu_sweep_share.py)
#
# Every part runs under `timeout`; a failing part prints its error and the script goes on; the exit
# code is non-zero when any part failed. Nothing is installed: the Python found as $PYTHON (default
# python3) must import torch, timm, ray, optuna, pytorch-metric-learning, pydantic (faiss optional).
#
#   bash bench/gpu_check.sh              # from the repository root, on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry    # the same parts in their CPU smoke modes (any machine)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--cpu-dry" ] && DRY=1
REPORT=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && REPORT="$OUT/gpu_check.txt"
fi

FAILED=()
START=$(date +%s)
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2 rc t0=$(date +%s)
    shift 2
    echo
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "!! $name: timed out after ${limit}s" || echo "!! $name: failed (exit $rc)"
        FAILED+=("$name")
    fi
    echo "-- $name: $(( $(date +%s) - t0 )) s"
}

versions() {
    if [ "$DRY" -eq 0 ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || return 1
    fi
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', \
torch.version.cuda, '| cuDNN', torch.backends.cudnn.version(), '| GPU', torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else 'none visible to torch'); sys.exit(0 if torch.cuda.is_available() or $DRY else 1)"
}
export -f versions
export PY DRY

main() {
    echo "dmlbench GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs$([ "$DRY" -eq 1 ] && echo ', CPU dry run')"
    part "a. versions" 30 bash -c versions
    if [ "$DRY" -eq 1 ]; then
        part "b. train throughput" 240 "$PY" -u bench/gpu_train_throughput.py --quick
        part "c1. eval retrieval" 240 "$PY" -u bench/gpu_eval_check.py --quick --no-clustering
        part "c2. eval clustering" 240 "$PY" -u bench/gpu_eval_check.py --quick --no-retrieval
        part "d. shared-GPU sweep" 240 "$PY" -u bench/gpu_sweep_share.py --dry-run
    else
        part "b. train throughput" 90 "$PY" -u bench/gpu_train_throughput.py
        part "c1. eval retrieval" 60 "$PY" -u bench/gpu_eval_check.py --no-clustering
        part "c2. eval clustering" 200 "$PY" -u bench/gpu_eval_check.py --no-retrieval
        part "d. shared-GPU sweep" 120 "$PY" -u bench/gpu_sweep_share.py --output "${TMPDIR:-/tmp}/gpucheck-results-$$"
    fi
    echo
    echo "total $(( $(date +%s) - START )) s; failed parts: ${FAILED[*]:-none}"
    [ "${#FAILED[@]}" -eq 0 ]
}

main 2>&1 | tee "$REPORT"
exit "${PIPESTATUS[0]}"
