#!/usr/bin/env bash
# The ablation table's gradient-variance column: for each trained distribution-matching run, the variance
# of the student's DM gradient on one fixed batch (16 draws, batch 8), with timestep sharing and with
# re-noising, on the run's final roles (student, critic) from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
FF=${FF:-.venv/bin/flowflash}
mkdir -p docs/bench
for spec in dmd2:dmd2-4 flash:flash-4-noshare flash:flash-4 flash:flash-2; do
  m=${spec%%:*} c=${spec#*:}
  "$FF" distill --method "$m" --config "configs/distill-$c.yaml" --measure-variance 16 --from-checkpoint \
    > "docs/bench/dm-grad-variance-$c.json"
done
