#!/usr/bin/env bash
# The issue-4 tables from the students of scripts/distill-emoji.sh: one `flowflash bench` run for the
# ablation table (quality on the 335 held-out prompts + speed), one for end-to-end speed and memory.
# Generated evaluation images are cached in runs/eval-cache (keyed by weights hash and settings).
# The committed table was measured with emoji-teacher v2 (git a75d5f7); `model:teacher` is now v3, and
# runs/distill/* must come from scripts/distill-emoji.sh run against the teacher you want to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
FF=${FF:-.venv/bin/flowflash}
D=runs/distill
"$FF" bench --quality --data data/emoji64 --cache runs/eval-cache --reps 5 --out docs/bench/distill-ablation \
  --setting teacher-50=model:teacher,steps:50,guidance:4 \
  --setting naive-4=model:$D/naive-4/student \
  --setting tg-4=model:$D/tg-4/student \
  --setting dmd2-4=model:$D/dmd2-4/student \
  --setting flash-4-no-sharing=model:$D/flash-4-noshare/student \
  --setting flash-4-no-split=model:$D/flash-4/student \
  --setting flash-4-no-adversarial=model:$D/flash-4-noadv/student \
  --setting flash-4=model:$D/flash-4-merged \
  --setting naive-2=model:$D/naive-2/student \
  --setting tg-2=model:$D/tg-2/student \
  --setting flash-2-no-split=model:$D/flash-2/student \
  --setting flash-2=model:$D/flash-2-merged
"$FF" bench --memory --reps 20 --out docs/bench/distill-speed \
  --setting teacher-50=model:teacher,steps:50,guidance:4 \
  --setting student-4=model:student \
  --setting student-2=model:$D/tg-2/student
