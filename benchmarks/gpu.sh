#!/usr/bin/env bash
# The GPU checks in one script of at most 8 minutes, for a machine with a CUDA GPU (issue 15):
#   1. vmap against the loop for equality on CUDA                      -> benchmarks/results/gpu-cuda-check.json
#   2. the training benchmark at 100 x 600 and 1000 x 60 clients, beside the plain Flower app and the
#      single-process loop, both fedunlearn execution modes, on CUDA   -> benchmarks/results/gpu-training-<c>x<e>.json
#   3. the memory benchmark at 1000 x 60 with caches, cohort mode      -> benchmarks/results/gpu-memory-1000.json
# and a summary of every step (status, seconds, exit code)             -> benchmarks/results/gpu-summary.json
#
# Usage, from the repository root:
#   bash benchmarks/gpu.sh                 # on the GPU machine; sources .gpu/prelude.sh when .gpu/ is there
#   GPU_SH_BUDGET_S=300 bash benchmarks/gpu.sh   # a smaller total budget (seconds)
#   GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh      # print the steps and their time limits, run nothing
#   GPU_SH_RESULTS=/tmp/r bash benchmarks/gpu.sh  # write the JSON files elsewhere
# On the lent machine (../shared/gpu/README.md): run tool, carry [".gpu"], command `bash benchmarks/gpu.sh`.
#
# Every step gets a time limit and the whole script a budget (default 480 s): a step that would start
# with less than its minimum left is skipped and recorded as such, so the script always ends inside the
# budget with whatever it measured written. Exit: 0 every step passed, 1 a step failed or timed out,
# 3 no CUDA device (nothing run).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_SH_BUDGET_S:-480}
DRY_RUN=${GPU_SH_DRY_RUN:-0}
RESULTS=${GPU_SH_RESULTS:-benchmarks/results}
START=$(date +%s)
STEPS_JSON=""

if [ -f .gpu/prelude.sh ]; then
  # shellcheck disable=SC1091
  source .gpu/prelude.sh || exit 1
fi
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "$DRY_RUN" != "1" ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing run" >&2
    exit 3
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME MIN_S MAX_S CMD...: run CMD with a limit of min(MAX_S, budget left); skip when less than MIN_S is left.
step() {
  local name=$1 min_s=$2 max_s=$3; shift 3
  local left=$(( BUDGET_S - $(elapsed) ))
  local limit=$(( left < max_s ? left : max_s ))
  local status rc=0 t0
  if [ "$limit" -lt "$min_s" ]; then
    echo "== $name: skipped ($left s of the budget left, needs $min_s s)"
    status=skipped rc=-1
    STEPS_JSON+="{\"step\": \"$name\", \"status\": \"$status\", \"rc\": null, \"seconds\": 0, \"limit_s\": $limit},"
    return 0
  fi
  echo "== $name (limit ${limit} s, $(elapsed) s elapsed): $*"
  if [ "$DRY_RUN" = "1" ]; then
    STEPS_JSON+="{\"step\": \"$name\", \"status\": \"dry-run\", \"rc\": null, \"seconds\": 0, \"limit_s\": $limit},"
    return 0
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status=timed-out ;;
    *) status=failed ;;
  esac
  echo "== $name: $status (rc $rc, $(( $(date +%s) - t0 )) s)"
  STEPS_JSON+="{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit},"
}

# 1. Equality first: the timings below mean nothing if vmap computes something else on CUDA.
step cuda-check 20 60 "$PY" -m benchmarks.cuda_check --device cuda --out "$RESULTS/gpu-cuda-check.json"
# 2. Training, 3 rounds (round 1 reported apart: CUDA start-up), every path; the GPU targets are 5x the
#    plain Flower app at 100 clients and 10x at 1000.
step training-100 60 170 "$PY" -m benchmarks.training --clients 100 --examples 600 --rounds 3 --device cuda \
  --timeout 150 --out "$RESULTS/gpu-training-100x600.json"
step training-1000 60 150 "$PY" -m benchmarks.training --clients 1000 --examples 60 --rounds 3 --device cuda \
  --variants flower-quickstart,single-process-loop,fedunlearn-cohort --timeout 130 --out "$RESULTS/gpu-training-1000x60.json"
# 3. Memory at 1000 clients with caches filled and uploaded and both IAU corrections, cohort mode.
step memory-1000 45 100 "$PY" -m benchmarks.memory --clients 1000 --examples 60 --device cuda --variants fedunlearn-cohort \
  --timeout 90 --out "$RESULTS/gpu-memory-1000.json"

mkdir -p "$RESULTS"
GPU_NAME=$([ "$DRY_RUN" = "1" ] && echo "dry-run" || "$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)
printf '{"benchmark": "gpu.sh", "budget_s": %s, "elapsed_s": %s, "device": "%s", "finished": "%s", "steps": [%s]}\n' \
  "$BUDGET_S" "$(elapsed)" "$GPU_NAME" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${STEPS_JSON%,}" > "$RESULTS/gpu-summary.json"
echo "gpu.sh: $(elapsed) s of $BUDGET_S; wrote $RESULTS/gpu-summary.json"
case "$STEPS_JSON" in
  *'"failed"'*|*'"timed-out"'*) exit 1 ;;
esac
exit 0
