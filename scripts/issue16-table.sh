#!/usr/bin/env bash
# The on-device table of issue 16: the student stored at fp16 (its original, from git history), bf16, and
# quantized to 8/6/4 bits, with and without MiniLM; the OpenVINO backend; low-memory loading; the teacher with
# and without MiniLM. One `flowflash bench` run: speed (interleaved), cold one-image processes, peak RSS,
# quality on the held-out prompt set.
set -euo pipefail
cd "$(dirname "$0")/.."
FF=.venv/bin/flowflash
[ -d data/emoji64 ] || $FF data build --out data/emoji64
if [ ! -d runs/student-fp16 ]; then  # the student before it was converted to int8 storage (commit 5bc3517)
    rm -rf runs/student-fp16-legacy && mkdir -p runs/student-fp16-legacy
    for f in $(git ls-tree --name-only 5bc3517^ src/flowflash/weights/emoji-student/); do
        git show "5bc3517^:$f" > "runs/student-fp16-legacy/$(basename "$f")"
    done
    $FF convert runs/student-fp16-legacy --storage fp16 --to runs/student-fp16
fi
for b in 8 6 4; do [ -d runs/student-q$b ] || $FF quantize runs/student-fp16 --bits $b --to runs/student-q$b; done
$FF bench \
  --setting student-fp32=model:runs/student-fp16 \
  --setting student-bf16=model:runs/student-fp16,precision:bf16 \
  --setting student-int8=model:runs/student-q8 \
  --setting student-int6=model:runs/student-q6 \
  --setting student-int4=model:runs/student-q4 \
  --setting student-int8-lowmem=model:runs/student-q8,lowmem:1 \
  --setting student-int8-openvino=model:runs/student-q8,backend:openvino-int8 \
  --setting student-fp32-nominilm=model:runs/student-fp16,minilm:false \
  --setting student-int8-nominilm=model:runs/student-q8,minilm:false \
  --setting student-int6-nominilm=model:runs/student-q6,minilm:false \
  --setting student-int4-nominilm=model:runs/student-q4,minilm:false \
  --setting teacher-50=model:teacher,steps:50,guidance:4 \
  --setting teacher-50-nominilm=model:teacher,steps:50,guidance:4,minilm:false \
  --baseline student-fp32 --reps 5 --cold 3 --memory --quality --data data/emoji64 \
  --cache runs/eval-cache --out runs/issue16-table
