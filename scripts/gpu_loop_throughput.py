"""Training throughput of the one loop on a GPU: teacher (rf) and distillation (tg, dmd2, flash) steps,
bf16 autocast against fp32, on the shipped emoji teacher's architecture.

A lent GPU machine reaches no package index and takes at most 64 MiB of files, so MiniLM (90 MB) cannot
travel: `prepare` (here, on the CPU) cuts a few hundred training rows of the corpus and encodes their
captions with MiniLM into the caption cache the trainer reads; `run` (there) trains from that cache.

    python scripts/gpu_loop_throughput.py prepare --data data/emoji64 --rows 400 --to gpu-data
    python scripts/gpu_loop_throughput.py run --data gpu-data --out $OUT      # on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "src" / "flowflash" / "weights" / "emoji-teacher"


def prepare(data: Path, rows: int, to: Path):
    from flowflash.data.dataset import read_manifest
    from flowflash.models.flow_model import read_config
    from flowflash.train.data import minilm_cache

    keep = [r for r in read_manifest(data) if r["split"] == "train"][:rows]
    (to / "images").mkdir(parents=True, exist_ok=True)
    for r in keep:
        shutil.copy(data / r["file"], to / r["file"])
    (to / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    cfg = read_config(TEACHER)
    minilm_cache([r["caption"] for r in keep], to, cfg.minilm_max_tokens)  # -> to/minilm_cache_24.safetensors
    print(f"{len(keep)} rows and their caption cache -> {to}")


RUNS = [  # name, kind, batch, steps, precision, extra config
    ("rf-bf16", "rf", 1024, 120, "bf16", {}),
    ("rf-fp32", "rf", 1024, 40, "fp32", {}),
    ("tg-bf16", "tg", 256, 60, "bf16", {"tg_pool": 512, "tg_teacher_steps": 6, "student_steps": 4}),
    ("dmd2-bf16", "dmd2", 256, 60, "bf16", {"student_steps": 4, "critic_ratio": 5, "timestep_sharing": False}),
    ("flash-bf16", "flash", 256, 60, "bf16", {"student_steps": 4, "critic_ratio": 5}),
]


def steady_rate(log: Path, batch: int) -> float:
    """Images per second over the second half of the logged steps (start-up and warm-up left out)."""
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    a, b = rows[(len(rows) - 1) // 2], rows[-1]
    return (b["step"] - a["step"]) * batch / (b["time"] - a["time"])


def run(data: Path, out: Path, smoke: bool = False):
    """smoke: a CPU dry run of the same code path (tiny batches, a few steps)."""
    import torch

    from flowflash.train.configs import DistillConfig, TeacherConfig
    from flowflash.train.run import distill, train_teacher

    device = "cpu" if smoke else "cuda"
    results = {"torch": torch.__version__, "device": "cpu" if smoke else torch.cuda.get_device_name(0), "rows": []}
    # no sample grids: they would need MiniLM, which is not on the GPU machine
    common = dict(data=str(data), device=device, log_every=2 if smoke else 5, ckpt_every=10_000, sample_every=0)
    for name, kind, batch, steps, precision, extra in RUNS:
        if smoke:
            batch, steps, extra = 4, 4, {**extra, "tg_pool": 8} if "tg_pool" in extra else extra
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.copy(data / "minilm_cache_24.safetensors", run_dir)  # the trainer finds its captions encoded
        t0 = time.time()
        if kind == "rf":
            cfg = TeacherConfig(out=str(run_dir), init_from=str(TEACHER), steps=steps, batch_size=batch,
                                precision=precision, warmup=10, **common)
            train_teacher(cfg)
        else:
            cfg = DistillConfig(out=str(run_dir), method=kind, teacher=str(TEACHER), steps=steps, batch_size=batch,
                                precision=precision, lr=1e-5, **common, **extra)
            distill(cfg)
        log = run_dir / "log.jsonl"
        last = json.loads(log.read_text().splitlines()[-1])
        row = {"run": name, "method": kind, "batch": batch, "steps": steps, "precision": precision,
               "img_s": steady_rate(log, batch), "wall_s": time.time() - t0,
               "peak_gpu_gib": 0.0 if smoke else torch.cuda.max_memory_allocated() / 2**30,
               "last_losses": {k: v for k, v in last.items() if k not in ("step", "time", "img_s")}}
        if not smoke:
            torch.cuda.reset_peak_memory_stats()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "gpu-loop.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # keep what comes back small


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--rows", type=int, default=400)
    a.add_argument("--to", type=Path, required=True)
    b = sub.add_parser("run")
    b.add_argument("--data", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--smoke", action="store_true", help="a CPU dry run: batch 4, 4 steps per run")
    args = p.parse_args()
    prepare(args.data, args.rows, args.to) if args.cmd == "prepare" else run(args.data, args.out, args.smoke)


if __name__ == "__main__":
    main()
