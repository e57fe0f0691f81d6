#!/usr/bin/env bash
# One command for a machine with a CUDA device: the GPU tests, the streaming and planner
# benchmarks on cuda, and `tileplan profile` of ResNet-34 at 8192² verified by a real step.
# Prints a short summary; logs and the plan go to $GPU_CHECK_OUT (default ./gpu_check).
# Designed to finish within 9 minutes on one H100 (each step has its own time limit).
#
#   bash bench/gpu_check.sh            # on a GPU machine
#   bash bench/gpu_check.sh --smoke    # the same steps on the CPU at toy sizes (tests the script)
#
# Without a CUDA device (and without --smoke) it says so and exits 0: nothing to check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-gpu_check}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

if [[ $SMOKE == 0 ]] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here: skipped (run with --smoke to exercise the steps on CPU)"
    exit 0
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

if [[ $SMOKE == 1 ]]; then
    DEVICE=cpu
    STREAM_ARGS=(--sizes 512:448 --memory 512:448 --repeats 1)
    PLANNER_ARGS=(--only 2 --sweep-image 512 --sweep-step 64)  # part 3 is the profile step below
    PROFILE_ARGS=(examples/small_cnn.py --image 512)
    DROPIN_ARGS=(--image 512 --budget 1GiB --repeats 1)
    LIMITS=(120 120 240 120 120)
else
    DEVICE=cuda
    STREAM_ARGS=(--sizes 2048:1536 4096:1536 8192:2048 --memory 4096:1536 8192:2048 --repeats 3)
    PLANNER_ARGS=(--only 1 2 3 --sweep-step 256)
    PROFILE_ARGS=(examples/resnet34.py --image 8192)
    DROPIN_ARGS=(--image 8192 --budget 8GiB --repeats 2)
    LIMITS=(100 100 140 90 70)  # seconds: 500 in all, under 9 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status="ok"
    if [[ $rc == 124 ]]; then status="TIMED OUT after ${limit}s"; elif [[ $rc != 0 ]]; then status="FAILED (exit $rc)"; fi
    [[ $status == ok ]] || FAILED=1
    echo "== $name: $status in $((SECONDS - start)) s ($OUT/$name.log)" | tee -a "$SUMMARY"
}

step gpu_tests "${LIMITS[0]}" python -m pytest -m gpu -q -p no:cacheprovider -s tests
step bench_streaming "${LIMITS[1]}" python bench/bench_streaming.py --device "$DEVICE" "${STREAM_ARGS[@]}"
step bench_planner "${LIMITS[2]}" python bench/bench_planner.py --device "$DEVICE" "${PLANNER_ARGS[@]}"
step profile "${LIMITS[3]}" python -m tileplan profile "${PROFILE_ARGS[@]}" --device "$DEVICE" \
    --verify --out "$OUT/plan.yaml"
step bench_dropin "${LIMITS[4]}" python bench/bench_dropin.py --device "$DEVICE" "${DROPIN_ARGS[@]}"

{
    echo "-- gpu tests"
    grep -E "passed|failed|skipped|error" "$OUT/gpu_tests.log" | tail -n 1
    grep -E "^tile [0-9]+ px: measured" "$OUT/gpu_tests.log"
    echo "-- streaming vs conventional (ResNet-18 trunk)"
    grep -E "^ *(image|[0-9]+ )|^memory" "$OUT/bench_streaming.log"
    echo "-- planner"
    grep -E "%$|chosen ÷ best|planner chose|wall time|^tile " "$OUT/bench_planner.log"
    echo "-- tileplan profile ${PROFILE_ARGS[*]} --device $DEVICE --verify"
    grep -E "^tile |^verified|^not verified|^trunk" "$OUT/profile.log"
    echo "-- tileplan.stream + loss.backward() vs the manual pair vs conventional (ResNet-34)"
    grep -E "^torch|^ *(dropin|manual|conventional) |^drop-in" "$OUT/bench_dropin.log"
} | tee -a "$SUMMARY"
exit $FAILED
