#!/usr/bin/env bash
# Issue 11's reproduction check: the shipped teacher (50 steps, CFG 4) and student on eval_v1, and their
# grid64-core recognition scores, (1) with the code before the refactor, (2) with the refactored code on
# the same fp16 weights, (3) with the weights stored as int8 weight-only. Images are cached per run, so
# (1) and (2) can be compared bit for bit (same cache keys). ~40 min on 2 cores.
# Usage: scripts/issue11-before-after.sh [BEFORE_REV]   (default 7362c98, the last commit before it)
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-7362c98}
PY=.venv/bin/python
OUT=runs/issue11
OLD=$OUT/before-src
mkdir -p "$OUT"
[ -d "$OLD" ] || git worktree add --detach "$OLD" "$REV"
BENCH_SETTINGS() {  # $1: teacher model, $2: student model
  echo "--setting teacher-50=model:$1,steps:50,guidance:4 --setting student-4=model:$2 --baseline teacher-50"
}
# (1) the code before, its own shipped fp16 weights
PYTHONPATH=$OLD/src $PY -m flowflash.cli bench $(BENCH_SETTINGS teacher student) --reps 1 --quality \
  --data data/emoji64 --cache $OUT/cache-before --out $OUT/bench-before
for m in teacher student; do
  PYTHONPATH=$OLD/src $PY -m flowflash.cli grid --prompts "$OLD/prompts/grid64-core.txt" --model $m \
    --score data/emoji64 -o $OUT/grid-before-$m.png
done
# (2) the refactored code on the same weights, indexed once (the files themselves are unchanged)
for m in teacher student; do
  rm -rf $OUT/fp16/emoji-$m && mkdir -p $OUT/fp16 && cp -r "$OLD/src/flowflash/weights/emoji-$m" $OUT/fp16/
done
$PY -c "from flowflash.models.storage import upgrade_legacy_shards as u; u('$OUT/fp16/emoji-teacher'); u('$OUT/fp16/emoji-student')"
$PY -m flowflash.cli bench $(BENCH_SETTINGS $OUT/fp16/emoji-teacher $OUT/fp16/emoji-student) --reps 1 --quality \
  --data data/emoji64 --cache $OUT/cache-after --out $OUT/bench-after
for m in teacher student; do
  $PY -m flowflash.cli grid --prompts grid64-core --model $OUT/fp16/emoji-$m --score data/emoji64 -o $OUT/grid-after-$m.png
done
# (3) int8 weight-only storage
for m in teacher student; do $PY -m flowflash.cli convert $OUT/fp16/emoji-$m --storage int8 --to $OUT/int8/emoji-$m; done
$PY -m flowflash.cli bench $(BENCH_SETTINGS $OUT/int8/emoji-teacher $OUT/int8/emoji-student) --reps 1 --quality \
  --data data/emoji64 --cache $OUT/cache-int8 --out $OUT/bench-int8
for m in teacher student; do
  $PY -m flowflash.cli grid --prompts grid64-core --model $OUT/int8/emoji-$m --score data/emoji64 -o $OUT/grid-int8-$m.png
done
# bit-for-bit: the cached image sets of (1) and (2) carry the same keys
$PY - <<'EOF'
from pathlib import Path
import torch
from safetensors.torch import load_file
for p in sorted(Path("runs/issue11/cache-before").glob("*.safetensors")):
    same = torch.equal(load_file(p)["images"], load_file(Path("runs/issue11/cache-after") / p.name)["images"])
    print(p.name, "bit-identical" if same else "DIFFERENT")
EOF
