#!/usr/bin/env bash
# Issue 15's students from the shipped teacher (v4): the 4-step and 2-step dmd2 candidates at two lrs, each
# exported at 300, 600 and 900 iterations (and a 2-step one started from the 4-step student, at 300 and 600,
# added after the other 2-step candidates missed the rule's floor), then the rule of docs/benchmarks.md ("Teacher v5 and its students:
# the rules fixed before training") applied by scripts/pick_students.py. Two one-thread lanes side by side; a
# finished stage is skipped on a rerun, an interrupted one resumes from its last checkpoint.
# `teacher` is v5 since stop 22: put v4 back first (git checkout a805d24 -- src/flowflash/weights/emoji-teacher).
# Usage: scripts/students-v4.sh   (logs: runs/students15/*.log; picks: docs/bench/pick-students-v4-{4,2}.*)
set -euo pipefail
cd "$(dirname "$0")/.."
FF=${FF:-.venv/bin/flowflash}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1

run() { scripts/distill-points.sh "$@"; }

mkdir -p runs/students15 docs/bench
lane_a() { run distill-dmd2-4-v4; run distill-dmd2-2-v4; run distill-dmd2-2-v4-from4 "300 600"; }
lane_b() { run distill-dmd2-4-v4-lr2e-4; run distill-dmd2-2-v4-lr2e-4; }
lane_a & a=$!
lane_b & b=$!
wait $a; wait $b
for n in 4 2; do
  cands=()
  for lr in lr1e-4 lr2e-4; do for at in 300 600 900; do cands+=("runs/students15/dmd2-$n-$lr-at$at"); done; done
  "$PY" scripts/pick_students.py --data data/emoji64 --out docs/bench/pick-students-v4-$n "${cands[@]}"
done
"$PY" scripts/pick_students.py --data data/emoji64 --out docs/bench/pick-students-v4-2-from4 \
  runs/students15/dmd2-2-from4-at300 runs/students15/dmd2-2-from4-at600
