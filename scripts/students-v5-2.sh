#!/usr/bin/env bash
# Issue 15's 2-step student from the shipped teacher v5, two candidates side by side (one thread each): dmd2 at 2 steps
# and one student trained for 4 and 2 steps (`also_steps: [2]`), each exported at 300, 600 and 900 iterations. Then the
# rule of docs/benchmarks.md ("One student for 4 and 2 steps: the rule fixed before the runs"): the 2-step pick over
# the six sampled at 2 steps, and the mixed ones at 4 steps as three more 4-step candidates. Finished points are
# skipped on a rerun.
# Usage: scripts/students-v5-2.sh   (logs: runs/students-v5/*.log; picks: docs/bench/pick-students-v5-{2,42-4}.*)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1

pids=()
for name in distill-dmd2-2-v5 distill-dmd2-42-v5; do
  scripts/distill-points.sh "$name" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
two=() mixed=()
for at in 300 600 900; do two+=("runs/students-v5/dmd2-2-lr1e-4-at$at"); mixed+=("runs/students-v5/dmd2-42-lr1e-4-at$at"); done
"$PY" scripts/pick_students.py --teacher teacher --data data/emoji64 --grids runs/pick-grids-v5 --steps 2 \
  --out docs/bench/pick-students-v5-2 "${two[@]}" "${mixed[@]}"
"$PY" scripts/pick_students.py --teacher teacher --data data/emoji64 --grids runs/pick-grids-v5 \
  --out docs/bench/pick-students-v5-42-4 "${mixed[@]}"
