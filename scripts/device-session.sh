#!/bin/bash
# One device session (H200, ~10 min in one call): issue 12's SD3 GPU bench, then issue 14's protocol in the time
# left. Prepared here (the device machine has no diffusers and cannot run MiniLM):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
#   python scripts/protocol14.py prepare --data data/emoji64 --captions 1000 --to /tmp/p14c
#   rm /tmp/p14c/images.safetensors && tar cJf .whl/p14c.tar.xz -C /tmp p14c   # 8.4 MB: the tree + wheel fit 64 MiB
# then, through the device tool: `bash scripts/device-session.sh` with carry [".whl"].
set -u
BENCH_S=${BENCH_S:-165}   # issue 12's bench (eager at 1024 and 512 px, compiled at 1024); 0 skips it
P14_S=${P14_S:-330}       # issue 14's protocol run, common start included; its runs are killed at this budget
SEEDS=${SEEDS:-0,1}       # 2 seeds x 3 points: each arm's image file stays under the 16 MiB a returned file may hold
STEPS=${STEPS:-4}         # the students' step count (4, or 2 for the protocol's 2-step rows)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/diffusers-*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
tar xJf .whl/p14c.tar.xz -C /tmp || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
start=$(date +%s)
if [ "$BENCH_S" -gt 0 ]; then  # BENCH_S=0 skips the bench (timeout 0 would mean no limit)
    timeout "$BENCH_S" python3 scripts/gpu_sd3_bench.py --out "$OUT" --compile-sizes 1024 2>&1 | grep -v "kept in float32"
    echo "bench: $(( $(date +%s) - start )) s"
fi
timeout $(( P14_S + 45 )) python3 scripts/protocol14.py run --data /tmp/p14c --out "$OUT" --device cuda \
    --seeds "$SEEDS" --arms A,B,C --updates 256 --batch 64 --parallel 6 --points all --budget "$P14_S" \
    --student-steps "$STEPS" 2>&1 \
    | grep -v "it/s\]\|s/it\]" | tail -n 40
for f in /tmp/p14-work/logs/*.log; do echo "== $f"; tail -c 240 "$f" | tr '\r' '\n' | tail -n 2; done
echo "total: $(( $(date +%s) - start )) s"; ls -la "$OUT"
