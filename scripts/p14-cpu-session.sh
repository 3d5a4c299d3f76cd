#!/bin/bash
# Issue 14's protocol at its CPU scale (docs/benchmarks.md: the amendments of stops 28 and 29), one session's share,
# from a clean checkout on a machine with no GPU. In the background, logs to a file:
#   SEEDS=2 nohup bash scripts/p14-cpu-session.sh > runs/p14cpu-session.log 2>&1 &
# It builds the corpus and the prepared captions if missing, freezes a copy of the code (so that edits in this
# checkout never reach a running arm), trains the common start (~17 min on the two cores) unless RESUME=1 finds it,
# runs the SEEDS' arms three at a time (~1 h per seed), draws the start's reference (REFS=tg,teacher adds the
# teacher's: ~25 more core-minutes, the same on every start), and writes the measures of the finished runs to
# docs/bench/protocol14-cpu/measures-$TAG.json. Then, here:
#   git add docs/bench/protocol14-cpu/measures-$TAG.json
#   .venv/bin/python scripts/protocol14.py score --measures docs/bench/protocol14-cpu/measures-*.json \
#       --out docs/bench/protocol14-cpu      # refuses measures of different common starts
# A session that stops early: RESUME=1 on the same machine goes on from the checkpoints (a fresh machine starts over).
# The 2-step rows are another experiment (their own start): their own work and measures folders, and the teacher's
# reference drawn for their start (score refuses measures of different starts, so they never share a folder):
#   SEEDS=0,1,2 W=$PWD/runs/p14cpu2 BENCH=docs/bench/protocol14-cpu2 REFS=tg,teacher P14_ARGS="--student-steps 2" \
#       nohup bash scripts/p14-cpu-session.sh > runs/p14cpu2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
SEEDS=${SEEDS:-0,1}
ARMS=${ARMS:-A,B,C}          # the split stage's session: ARMS=A P14_ARGS="--split-from A --split-updates 128 --split-at 0.5"
P14_ARGS=${P14_ARGS:-}
MID=""                       # the noise table at the runs' middle: the first seed's only (pre-registered)
[[ $SEEDS == 0* ]] || MID="--no-noise-mid"
TAG=${TAG:-$(date +%Y%m%d-%H%M)}
REFS=${REFS:-tg}
W=${W:-$ROOT/runs/p14cpu}    # the frozen code, the work and the images (runs/ is not tracked)
BENCH=${BENCH:-docs/bench/protocol14-cpu}   # the measures' folder, one per common start (4-step; 2-step: -cpu2)
MEASURES=$ROOT/$BENCH/measures-$TAG.json
[ -x "$PY" ] || make -s .venv/bin/flowflash
[ -d data/emoji64 ] || .venv/bin/flowflash data build --out data/emoji64
[ -d p14-data ] || OMP_NUM_THREADS=2 "$PY" scripts/protocol14.py prepare --data data/emoji64 --captions 1000 --to p14-data
if [ ! -d "$W/code" ]; then
    mkdir -p "$W"
    git clone -q "$ROOT" "$W/code"
    ln -s "$ROOT/data" "$W/code/data"
    ln -s "$ROOT/p14-data" "$W/code/p14-data"
fi
cd "$W/code"
echo "frozen code at $(git rev-parse --short HEAD); seeds $SEEDS; $(date)"
R=""
[ "${RESUME:-0}" = 1 ] && R="--resume"
# the pre-registered CPU scale (benchmarks.md, amendment of stop 28); --budget: no stop before the end
"$PY" scripts/protocol14.py run --data p14-data --out "$W/out" --work "$W/work" --device cpu \
    --seeds "$SEEDS" --arms "$ARMS" --updates 256 --batch 8 --start-batch 8 --tg-iters 1000 --tg-pool 512 \
    --warm-iters 500 --noise-k 16 --noise-ref 128 --points half --parallel 3 --threads 1 --ckpt-updates 16 \
    --budget 100000 $MID $R $P14_ARGS
OMP_NUM_THREADS=2 "$PY" scripts/protocol14.py baselines --data p14-data --work "$W/work" --out "$W/out" \
    --threads 2 --refs "$REFS"
mkdir -p "$(dirname "$MEASURES")"
OMP_NUM_THREADS=2 "$PY" scripts/protocol14.py measure --runs "$W/out" --work "$W/work" --data data/emoji64 \
    --prep p14-data --to "$MEASURES"
echo "done $(date): $MEASURES"
