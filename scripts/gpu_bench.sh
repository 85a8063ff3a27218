#!/usr/bin/env bash
# The GPU benchmarks in one command, for a machine with one NVIDIA GPU.
#
#   scripts/gpu_bench.sh [--quick] [RESULTS_DIR]
#
# Runs, within an overall time bound (GPU_BENCH_SECONDS, default 420 s, model builds
# included):
#   1. bench/multisource.py --device cuda --preset large --sources 1,32,64,128,192
#      --batch-max 256
#      -> RESULTS_DIR/multisource_cuda_large.{json,md}: one at a time vs batched, the
#      number of 10 s / 5 s streams kept up with, GPU name, driver, peak GPU memory;
#   2. bench/pipeline.py --device cuda --preset large --variants b
#      -> RESULTS_DIR/pipeline_cuda_large.{json,md}: per-stage seconds, optimised vs naive.
# and a log, RESULTS_DIR/gpu_bench.log. RESULTS_DIR defaults to bench/results.
#
# Each step writes its JSON after every measured call, so a run cut short by the bound
# keeps what it measured ("complete": false). Each model build (random weights) happens
# once per step's process. Runs with the machine's own python3 (or $PYTHON), with the
# repository put in front of PYTHONPATH (carried wheels may already be on it).
#
# Environment: GPU_BENCH_SECONDS (overall bound), GPU_BENCH_SOURCES (batch sizes of step
# 1), GPU_BENCH_DEVICE (default cuda), GPU_BENCH_PRESET (default large), PYTHON.
# --quick: the tiny preset with small settings on GPU_BENCH_DEVICE (default cpu), a smoke
# run of the script itself (seconds to minutes on a CPU).
set -u -o pipefail

quick=0
if [ "${1:-}" = "--quick" ]; then
    quick=1
    shift
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/bench/results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
budget=${GPU_BENCH_SECONDS:-420}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root" || exit 1
start=$SECONDS
log="$out/gpu_bench.log"
exec > >(tee -a "$log") 2>&1

if [ "$quick" = 1 ]; then
    device=${GPU_BENCH_DEVICE:-cpu}
    preset=tiny
    sources=${GPU_BENCH_SOURCES:-1,2}
    multi_extra=(--quick --reps 1)
    pipe_extra=(--quick --variants a)
else
    device=${GPU_BENCH_DEVICE:-cuda}
    preset=${GPU_BENCH_PRESET:-large}
    sources=${GPU_BENCH_SOURCES:-1,32,64,128,192}
    # a GPU gains from batches far larger than the daemon's default batch_max (8)
    multi_extra=(--no-warm-each --reps 3 --batch-max 256)
    pipe_extra=(--variants b)
fi
threads=$(nproc 2>/dev/null || echo 4)

left() { echo $((budget - (SECONDS - start))); }

echo "== gpu_bench $(date -u +%FT%TZ): device $device, preset $preset, bound ${budget} s, out $out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
"$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
    || { echo "gpu_bench: $py cannot import torch"; exit 1; }
grep -m1 '^model name' /proc/cpuinfo || true
echo "load average: $(cat /proc/loadavg 2>/dev/null)"

status=0
# Step 1 gets 60% of the bound (its measuring stops 120 s before: imports, model build,
# the last call in flight); step 2 the rest.
step1=$(( $(left) * 60 / 100 ))
measure1=$(( step1 - 120 > 30 ? step1 - 120 : 30 ))
echo "== step 1: multisource, up to ${step1} s (measuring ${measure1} s)"
timeout -k 10 "$step1" "$py" bench/multisource.py --device "$device" --preset "$preset" \
    --sources "$sources" --seconds "$measure1" --out-dir "$out" "${multi_extra[@]}"
rc=$?
[ "$rc" = 0 ] || { echo "gpu_bench: step 1 ended with status $rc (124: cut by the bound)"; status=1; }

step2=$(left)
if [ "$step2" -lt 30 ]; then
    echo "gpu_bench: no time left for step 2 (${step2} s)"
    status=1
else
    echo "== step 2: pipeline, up to ${step2} s"
    timeout -k 10 "$step2" "$py" bench/pipeline.py --device "$device" --preset "$preset" \
        --threads "$threads" --out "$out/pipeline_${device%%:*}_${preset}.json" "${pipe_extra[@]}"
    rc=$?
    [ "$rc" = 0 ] || { echo "gpu_bench: step 2 ended with status $rc (124: cut by the bound)"; status=1; }
fi
echo "== gpu_bench done in $((SECONDS - start)) s, status $status; results:"
ls -l "$out"/multisource_* "$out"/pipeline_"${device%%:*}"_* 2>/dev/null
exit "$status"
