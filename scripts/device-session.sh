#!/bin/bash
# One device session (H200, ~10 min in one call): issue 14's protocol (issue 12's SD3 GPU bench first with
# BENCH_S=165, which then shares the call's time). Prepared here (the device machine has no diffusers and cannot
# run MiniLM):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
#   python scripts/protocol14.py prepare --data data/emoji64 --captions 1000 --to /tmp/p14c
#   rm /tmp/p14c/images.safetensors && tar cJf .whl/p14c.tar.xz -C /tmp p14c   # 8.4 MB: the tree + wheel fit 64 MiB
# then, through the device tool: `bash scripts/device-session.sh` with carry [".whl"] (timeout_s 600), and at once
# after it, while the machine is still warm (it goes back after 30 s idle), with what the session has left:
# `RESUME=1 P14_S=<seconds left - 80> bash scripts/device-session.sh`: the stopped runs go on from their checkpoints
# (if none was stopped, add SEEDS=3,4,5: new seeds from the same common start; a call returns its own seeds' images).
# A dry run of both calls here (stop 27; PATH with the venv's python3 first, OUT set):
#   BASELINES=0 DEVICE=cpu UPDATES=8 BATCH=2 PARALLEL=3 SEEDS=0 P14_S=70 P14_ARGS="--tg-iters 4 --warm-iters 4 --start-batch 4
#   --tg-pool 8 --noise-k 2 --noise-ref 2 --ckpt-updates 3 --no-noise-mid" bash scripts/device-session.sh, then the
#   same with RESUME=1 P14_S=600.
set -u
BENCH_S=${BENCH_S:-0}     # issue 12's bench (eager at 1024 and 512 px, compiled at 1024; ~130 s); 0 skips it
BENCH_ARGS=${BENCH_ARGS---compile-sizes 1024}  # e.g. "--skip-eager --sizes 1024 --vae-layout contiguous"
P14_S=${P14_S:-$(( 500 - BENCH_S ))}  # issue 14's protocol, common start included: its runs are stopped (and
                          # checkpoint) at this budget, what the bench leaves of the call's 600 s; 0 skips it
SEEDS=${SEEDS:-0,1,2}     # 3 seeds x 2 points (--points half): each arm's image file stays under the 16 MiB a
                          # returned file may hold, and all of them under the 64 MB that come back
STEPS=${STEPS:-4}         # the students' step count (4, or 2 for the protocol's 2-step rows)
PARALLEL=${PARALLEL:-9}   # arm runs at a time (each is bound by kernel launches at batch 64: one CPU core each)
RESUME=${RESUME:-0}       # 1: go on from this machine's /tmp/p14-work (a second call while it is still warm)
ARMS=${ARMS:-A,B,C}       # or the secondary arms (B_matching,B_uniform,B_teacher,B_adv: B_adv needs the images)
P14_ARGS=${P14_ARGS:-}    # more protocol14.py run arguments, e.g. "--split-from B --split-updates 100"
UPDATES=${UPDATES:-256}   # student updates per run; BATCH its batch; DEVICE=cpu for a dry run here
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-cuda}
if [ "$RESUME" = 1 ] && [ ! -f /tmp/p14-work/report.json ]; then  # a fresh machine: nothing to go on from
    echo "RESUME=1, but this machine has no /tmp/p14-work/report.json (the warm one went back?): nothing to resume"
    exit 3
fi
# a second call on the same warm machine finds both in place
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/diffusers-*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
[ -d /tmp/p14c ] || tar xJf .whl/p14c.tar.xz -C /tmp || exit 1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
start=$(date +%s)
if [ "$BENCH_S" -gt 0 ]; then  # BENCH_S=0 skips the bench (timeout 0 would mean no limit)
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout "$BENCH_S" python3 scripts/gpu_sd3_bench.py --out "$OUT" $BENCH_ARGS 2>&1 \
        | grep -v "kept in float32\|lru_cache\|originates from\|upsampling.py\|is_torch_version\|warn_once\|^$"
    echo "bench: $(( $(date +%s) - start )) s"
fi
if [ "$P14_S" -le 0 ]; then echo "total: $(( $(date +%s) - start )) s"; ls -la "$OUT"; exit 0; fi
timeout $(( P14_S + 60 )) python3 scripts/protocol14.py run --data /tmp/p14c --out "$OUT" --device "$DEVICE" \
    --seeds "$SEEDS" --arms "$ARMS" --updates "$UPDATES" --batch "$BATCH" --parallel "$PARALLEL" --points half \
    --budget "$P14_S" \
    --student-steps "$STEPS" $( [ "$RESUME" = 1 ] && echo --resume ) $P14_ARGS 2>&1 \
    | grep -v "it/s\]\|s/it\]" | tail -n 40
# the references every arm is judged against, drawn once per machine on its common start (the teacher at 50 CFG
# steps and the tg start: ~7 MB back; seconds on a GPU; BASELINES=0 skips them, e.g. in a CPU dry run)
if [ "${BASELINES:-1}" = 1 ] && [ -d /tmp/p14-work/tg/student ] && [ ! -f /tmp/p14-work/baselines.done ]; then
    timeout 90 python3 scripts/protocol14.py baselines --data /tmp/p14c --work /tmp/p14-work --out "$OUT" \
        --device "$DEVICE" --threads 4 && touch /tmp/p14-work/baselines.done
fi
for f in /tmp/p14-work/logs/*.log; do echo "== $f"; tail -c 240 "$f" | tr '\r' '\n' | tail -n 2; done
[ -f "$OUT/protocol14.json" ] && python3 -c "import json, sys; r = json.load(open(sys.argv[1]));
print(json.dumps({'start': r.get('start'), 'noise_s': r.get('noise', {}).get('seconds'),
    'runs_s': [(x['arm'], x['seed'], round(x['seconds'])) for x in r.get('run_records', [])]}))" "$OUT/protocol14.json"
echo "total: $(( $(date +%s) - start )) s"; ls -la "$OUT"
