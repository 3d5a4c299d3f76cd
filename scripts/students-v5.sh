#!/usr/bin/env bash
# Issue 15's 4-step students from the shipped teacher v5 (`teacher`, since stop 22): dmd2 at lr 1e-4 and 2e-4 on the wide corpus, each exported at 300, 600 and 900
# iterations, then the rule of docs/benchmarks.md ("Teacher v5 and its students: the rules fixed before training") applied by
# scripts/pick_students.py, judged on the same corpus and grids as the v4 students. Two one-thread lanes side by side;
# finished points are skipped on a rerun.
# Usage: scripts/students-v5.sh   (logs: runs/students-v5/*.log; pick: docs/bench/pick-students-v5-4.*)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1

LRS=${LRS:-lr1e-4 lr2e-4}  # LRS=lr1e-4: one lane only
pids=()
for lr in $LRS; do
  scripts/distill-points.sh distill-dmd2-4-v5$([ "$lr" = lr1e-4 ] || echo "-$lr") & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
cands=()
for lr in $LRS; do for at in 300 600 900; do cands+=("runs/students-v5/dmd2-4-$lr-at$at"); done; done
"$PY" scripts/pick_students.py --teacher teacher --data data/emoji64 --grids runs/pick-grids-v5 --out docs/bench/pick-students-v5-4 "${cands[@]}"
