#!/usr/bin/env bash
# One dmd2 (or METHOD=flash) candidate exported at several update counts: distill-points.sh CONFIG_NAME [POINTS] writes the student
# at each point (default 300 600 900 iterations) as <out>-at<N>, <out> being the config's `out:`. A finished point
# is skipped on a rerun and an interrupted one resumes from its last checkpoint. Log: <out>.log.
# Each point is a step number (`--until-step`). Until stop 23 this script passed it as `--max-steps`, which counts
# one invocation's steps, so a resumed run overshot: its "600" export was the run's end.
set -euo pipefail
cd "$(dirname "$0")/.."
FF=${FF:-.venv/bin/flowflash}
method=${METHOD:-dmd2}
config=configs/$1.yaml
points=${2:-300 600 900}
out=$(sed -n 's/^out: *//p' "$config")
mkdir -p "$(dirname "$out")"
for n in $points; do
  [ -d "$out-at$n" ] && continue
  resume=(); [ -f "$out/checkpoint/state.json" ] && resume=(--resume)
  "$FF" distill --method "$method" --config "$config" "${resume[@]}" --until-step "$n" >> "$out.log" 2>&1
  cp -r "$out/student" "$out-at$n.tmp" && mv "$out-at$n.tmp" "$out-at$n"
done
