#!/usr/bin/env bash
# Every student of the issue-4 ablation table, from the shipped teacher, on 2 CPU cores: two lanes of one
# thread each run side by side (small models use a second thread poorly). A finished run leaves DONE in
# its folder and is skipped on a rerun; an interrupted one resumes from its last checkpoint.
# Usage: scripts/distill-emoji.sh   (logs: runs/distill/*.log)
set -euo pipefail
cd "$(dirname "$0")/.."
FF=${FF:-.venv/bin/flowflash}
export OMP_NUM_THREADS=1
SWEEP=0,0.25,0.5,0.75,1

run() {  # run METHOD CONFIG: train one student unless done
  local method=$1 config=configs/$2.yaml
  local out; out=$(sed -n 's/^out: *//p' "$config")
  [ -f "$out/DONE" ] && return 0
  local resume=(); [ -f "$out/checkpoint/state.json" ] && resume=(--resume)
  "$FF" distill --method "$method" --config "$config" "${resume[@]}" > "runs/distill/$2.log" 2>&1
  touch "$out/DONE"
}

merge() {  # merge N: choose the split branches' ratio on training prompts, write the merged student
  local n=$1
  local out=runs/distill/flash-$n-merged
  [ -f "$out/DONE" ] && return 0
  "$FF" merge runs/distill/flash-$n-low/student runs/distill/flash-$n-high/student --sweep $SWEEP \
    --data data/emoji64 --report docs/bench/merge-sweep-$n -o "$out" > "runs/distill/merge-$n.log" 2>&1
  touch "$out/DONE"
}

mkdir -p runs/distill docs/bench
lane_a() { run tg distill-tg-4; run flash distill-flash-4; run flash distill-flash-4-split-low;
           run flash distill-flash-4-split-high; merge 4; run flash distill-flash-4-noadv; }
lane_b() { run tg distill-tg-2; run dmd2 distill-dmd2-4; run flash distill-flash-2; run flash distill-flash-2-split-low;
           run flash distill-flash-2-split-high; merge 2; run flash distill-flash-4-noshare; }
lane_a & a=$!
lane_b & b=$!
wait $a; wait $b
for n in 4 2; do "$FF" distill --method naive --student-steps $n --out runs/distill/naive-$n > /dev/null; done
