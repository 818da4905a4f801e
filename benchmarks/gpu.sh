#!/usr/bin/env bash
# The benchmarks that need a GPU, on CUDA: big_models.py's full grid (both tasks, both models,
# m = 1 3 10, n = 100 500) and the distillation paper preset. Rows land in benchmarks/results/:
#   big_models_cuda.json          big_models.py's rows (time, trajectory and max_memory_allocated)
#   budget_cuda.json              the memory-budget rows (issue 23): the wide MLP's distillation, m = 10,
#                                 n = 100 and 500, Full(max_memory = the smaller peer's trajectory, and 2x)
#   distill_paper_cuda.json       the paper preset's metrics.json (its run directory: runs/distill-paper-cuda)
# Without CUDA it says so and exits 0. Usage: [REPS=5] benchmarks/gpu.sh [extra big_models.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
if [[ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" != "True" ]]; then
    echo "benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); nothing run"
    exit 0
fi
OUT=benchmarks/results
mkdir -p "$OUT" runs
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'
status=0  # a hypergradient beyond big_models.py's --tol fails it after all rows are written: run the preset anyway
"$PY" benchmarks/big_models.py --device cuda --reps "${REPS:-5}" --json "$OUT/big_models_cuda.json" "$@" || status=$?
"$PY" benchmarks/big_models.py --device cuda --reps "${REPS:-5}" --tasks distill --models wide-mlp --members 10 \
    --steps 100 500 --impl metaopt-budget metaopt-compiled-budget metaopt-budget-2x metaopt-compiled-budget-2x \
    higher torchopt --json "$OUT/budget_cuda.json" || status=$?
rm -rf runs/distill-paper-cuda
"$PY" -m metaopt run distill --preset paper --device cuda --out runs/distill-paper-cuda
cp runs/distill-paper-cuda/metrics.json "$OUT/distill_paper_cuda.json"
echo "benchmarks/gpu.sh: wrote $OUT/big_models_cuda.json, $OUT/budget_cuda.json and $OUT/distill_paper_cuda.json"
exit "$status"
