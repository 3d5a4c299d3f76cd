#!/usr/bin/env bash
# Issue 15's shipping checks for a student picked from teacher v5 (docs/benchmarks.md, "Students from teacher v5"):
# one `flowflash bench --quality` run per prompt set, the picked export beside the shipped teacher (v5, 50 steps,
# CFG 4) and the shipped student; with --two, the same export sampled at 2 steps too (a student trained with
# also_steps: [2]). Ratios are of interleaved medians; the teacher's images come from the cache when present.
# Run it before shipping (`model:student` is then still the previous student).
# Usage: scripts/bench-students-v5.sh runs/students-v5/<picked> [--two]   (writes docs/bench/$STEM-*, STEM defaulting
# to students-v5: the second look's files; the third look's are STEM=students-v5-look3)
set -euo pipefail
cd "$(dirname "$0")/.."
FF=${FF:-.venv/bin/flowflash}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pick=$1
stem=${STEM:-students-v5}
prev=${PREV:-student-v4-4}  # the name of the shipped student's row (the third look: PREV=student-v5-look2-4)
extra=()
[ "${2:-}" = --two ] && extra=(--setting "student-v5-2=model:$pick,steps:2")
for ps in eval_v1 plain_v1; do
  "$FF" bench --setting teacher-v5-50=model:teacher,steps:50,guidance:4 --setting "student-v5-4=model:$pick" \
    "${extra[@]}" --setting "$prev=model:student" --baseline teacher-v5-50 --reps 3 --quality \
    --data data/emoji64 --prompts "$ps" --cache runs/eval-cache --out "docs/bench/$stem-$ps"
done
