#!/usr/bin/env bash
# Issue 15's 4-step students from the shipped teacher once it is v5 (run it after `flowflash train ship` of v5): dmd2 at
# lr 1e-4 and 2e-4 on the wide corpus, each exported at 300, 600 and 900 updates, then the rule of
# docs/benchmarks.md ("Teacher v5 and its students: the rules fixed before training") applied by
# scripts/pick_students.py, judged on the same corpus and grids as the v4 students. Two one-thread lanes side by side;
# finished points are skipped on a rerun.
# Usage: scripts/students-v5.sh   (logs: runs/students-v5/*.log; pick: docs/bench/pick-students-v5-4.*)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1

scripts/distill-points.sh distill-dmd2-4-v5 & a=$!
scripts/distill-points.sh distill-dmd2-4-v5-lr2e-4 & b=$!
wait $a; wait $b
cands=()
for lr in lr1e-4 lr2e-4; do for at in 300 600 900; do cands+=("runs/students-v5/dmd2-4-$lr-at$at"); done; done
"$PY" scripts/pick_students.py --data data/emoji64 --grids runs/pick-grids-v5 --out docs/bench/pick-students-v5-4 "${cands[@]}"
