#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md: every network at 128^3, batch 2, on one CUDA GPU, with nnU-Net's autocast in
# fp16 (with GradScaler, nnU-Net's default) and bf16, torch.compile off and on; peak memory from
# torch.cuda.max_memory_allocated; each row also checks that every timed training loss is finite under autocast.
# Each configuration is one run of benchmarks/bench.py (ratios to PlainConvUNet from the same run) and appends its
# own section to benchmarks/RESULTS.md. Sized for under 8 minutes on one current GPU; a run that would overrun is cut
# by the per-run timeout and says so. Nothing else in nnyseg needs a GPU.
#
#   bash benchmarks/gpu.sh            # all four runs
#   GPU_BENCH_BUDGET_S=300 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA device visible to torch; nothing to measure" >&2
    exit 2
fi
budget=${GPU_BENCH_BUDGET_S:-450}
start=$(date +%s)
common=(--patch 128 128 128 --batch 2 --device cuda --warmup 2 --repeats 5)
status=0
# (dtype, compile) pairs in order of importance: nnU-Net's default first.
for run in "fp16 off" "bf16 off" "fp16 on" "bf16 on"; do
    set -- $run
    left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 60 ]; then
        echo "benchmarks/gpu.sh: time budget spent; skipping amp $1, compile $2" >&2
        status=1
        continue
    fi
    extra=(--amp-dtype "$1")
    [ "$2" = on ] && extra+=(--compile)
    echo "== amp $1, torch.compile $2 (at most ${left} s)"
    if ! timeout "$left" "$PY" benchmarks/bench.py "${common[@]}" "${extra[@]}" --note "benchmarks/gpu.sh: amp $1, torch.compile $2"; then
        echo "benchmarks/gpu.sh: the run with amp $1, compile $2 failed or ran out of time" >&2
        status=1
    fi
done
echo "benchmarks/gpu.sh finished in $(( $(date +%s) - start )) s"
exit $status
