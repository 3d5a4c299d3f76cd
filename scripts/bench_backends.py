"""torch vs OpenVINO (fp32, int8, int4 weights) for one emoji model, side by side, repetitions interleaved.

Per image at batch 1: warm seconds end to end (`Pipeline.run` of one prompt and seed, text encoders included),
median of --reps after --warmup images per backend; every repetition has a prompt of its own, the same one on
every backend, and the backends take turns in a rotating order so drift in the machine's load hits all alike.
Pixels: max and mean abs difference of each backend's uint8 images from torch's over those repetitions' images.
Loads: each in a fresh process (imports of flowflash and torch not counted; of openvino and NNCF counted, as
they happen inside `Pipeline.load`), medians of --load-reps alternating rounds; first load = an empty cache
(export included), cached load = the IR that first load wrote. The OpenVINO cache lives in a temporary folder
(FLOWFLASH_OPENVINO_CACHE), never the user's. RSS: the load process's peak after loading and drawing one image.

    .venv/bin/python scripts/bench_backends.py --out docs/bench/backends     # the shipped student
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

BACKENDS = [("torch", "fp32"), ("openvino", "fp32"), ("openvino", "int8"), ("openvino", "int4")]
PROMPTS = Path(__file__).resolve().parent.parent / "src/flowflash/eval/prompts/grid64.txt"

LOAD_CODE = """
import json, sys, time
from flowflash.runtime.pipeline import Pipeline
model, backend, weights = sys.argv[1:4]
t0 = time.perf_counter()
pipe = Pipeline.load(model, backend=backend, ov_weights=weights)
load_s = time.perf_counter() - t0
pipe.run(["red apple, twemoji style"], [0])
runner = pipe.model.net.transformer_runner
info = runner.info if runner is not None else None
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"load_s": load_s, "exported": info.exported if info else None,
                  "export_s": info.export_s if info else None, "compile_s": info.compile_s if info else None,
                  "ir_bytes": info.ir_bytes if info else None, "rss_mb": rss}))
"""


def git_state() -> str:
    """HEAD's short hash, with "+dirty" when the working tree has changes (the code measured)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def label(backend: str, weights: str) -> str:
    return "torch fp32" if backend == "torch" else f"openvino {weights}"


def timed_load(model: str, backend: str, weights: str, cache: Path) -> dict:
    env = {**os.environ, "FLOWFLASH_OPENVINO_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD_CODE, model, backend, weights], capture_output=True, text=True,
                         env=env, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"load of {label(backend, weights)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_loads(model: str, rounds: int, root: Path) -> dict:
    """{label: {"first": [...], "cached": [...]}} over alternating rounds; each round's first load starts empty."""
    res = {label(b, w): {"first": [], "cached": []} for b, w in BACKENDS}
    for r in range(rounds):
        for backend, weights in BACKENDS:
            name = label(backend, weights)
            if backend == "torch":
                res[name]["first"].append(timed_load(model, backend, weights, root / "unused"))
                continue
            cache = root / f"loads-{weights}"
            shutil.rmtree(cache, ignore_errors=True)
            first = timed_load(model, backend, weights, cache)
            cached = timed_load(model, backend, weights, cache)
            if not first["exported"] or cached["exported"]:
                raise SystemExit(f"{name}: expected an export then a cache hit, got {first} then {cached}")
            res[name]["first"].append(first)
            res[name]["cached"].append(cached)
        print(f"load round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="student")
    ap.add_argument("--reps", type=int, default=24, help="timed images per backend (distinct prompts)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--load-reps", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True, help="results path stem: writes STEM.json and STEM.md")
    a = ap.parse_args()

    import torch

    from flowflash.images import pil_to_u8
    from flowflash.runtime.pipeline import Pipeline

    prompts = [p.strip() for p in PROMPTS.read_text().splitlines() if p.strip()]
    if a.reps + a.warmup > len(prompts):
        raise SystemExit(f"at most {len(prompts) - a.warmup} reps: {PROMPTS.name} has {len(prompts)} prompts")
    root = Path(tempfile.mkdtemp(prefix="ff-bench-backends-"))
    try:
        os.environ["FLOWFLASH_OPENVINO_CACHE"] = str(root / "run")
        loads = measure_loads(a.model, a.load_reps, root)

        pipes = {label(b, w): Pipeline.load(a.model, backend=b, ov_weights=w) for b, w in BACKENDS}
        names = list(pipes)
        first = next(iter(pipes.values()))
        for i in range(a.warmup):
            for name in names:
                pipes[name].run([prompts[-1 - i]], [10_000 + i])
        times = {n: [] for n in names}
        parts = {n: {"text_s": [], "denoise_s": [], "decode_s": []} for n in names}
        images = {n: [] for n in names}
        for r in range(a.reps):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for name in order:
                t0 = time.perf_counter()
                gen = pipes[name].run([prompts[r]], [r])
                times[name].append(time.perf_counter() - t0)
                for k in parts[name]:
                    parts[name][k].append(getattr(gen.timings, k))
                images[name].append(pil_to_u8(gen.images).to(torch.int16))
        ref = torch.cat(images["torch fp32"])
        rows = []
        for (backend, weights), name in zip(BACKENDS, names):
            diff = (torch.cat(images[name]) - ref).abs()
            ld = loads[name]
            runner = pipes[name].model.net.transformer_runner
            row = {"backend": backend, "weights": weights, "label": name,
                   "per_image_s": statistics.median(times[name]),
                   **{k: statistics.median(v) for k, v in parts[name].items()},
                   "first_load_s": statistics.median(x["load_s"] for x in ld["first"]),
                   "cached_load_s": statistics.median(x["load_s"] for x in ld["cached"]) if ld["cached"] else None,
                   "export_s": statistics.median(x["export_s"] for x in ld["first"]) if ld["cached"] else None,
                   "ir_bytes": runner.info.ir_bytes if runner is not None else None,
                   "max_abs_px": int(diff.max()), "mean_abs_px": float(diff.float().mean()),
                   "images_over_1px": int((diff.flatten(1).amax(1) > 1).sum()),
                   "rss_mb": statistics.median(x["rss_mb"] for x in ld["cached"] or ld["first"]),
                   "per_image_runs_s": [round(t, 5) for t in times[name]]}
            rows.append(row)
        torch_s = rows[0]["per_image_s"]
        fp32_ir = rows[1]["ir_bytes"]
        for row in rows:
            row["vs_torch"] = row["per_image_s"] / torch_s
            row["ir_vs_fp32"] = row["ir_bytes"] / fp32_ir if row["ir_bytes"] else None
        res = {"model": a.model, "model_hash": first.hash, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "reps": a.reps, "warmup": a.warmup, "load_reps": a.load_reps, "images_compared": a.reps,
               "versions": {p: version(p) for p in ("torch", "diffusers", "openvino", "nncf")}, "git": git_state(),
               "rows": rows, "loads": loads, "command": " ".join(["python", *sys.argv])}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = ["| backend | s/image (median) | vs torch | text / denoise / decode s | first load s (export) | "
             "cached load s | IR MB (vs fp32) | max / mean abs px vs torch | images > 1 px | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ir = f"{r['ir_bytes'] / 1e6:.1f} ({r['ir_vs_fp32']:.2f}x)" if r["ir_bytes"] else "–"
        exp = f" ({r['export_s']:.1f})" if r["export_s"] is not None else ""
        cached = f"{r['cached_load_s']:.2f}" if r["cached_load_s"] is not None else "–"
        lines.append(f"| {r['label']} | {r['per_image_s'] * 1000:.1f} ms | {r['vs_torch']:.2f}x | "
                     f"{r['text_s'] * 1000:.1f} / {r['denoise_s'] * 1000:.1f} / {r['decode_s'] * 1000:.1f} ms | "
                     f"{r['first_load_s']:.2f}{exp} | {cached} | {ir} | {r['max_abs_px']} / {r['mean_abs_px']:.3f} | "
                     f"{r['images_over_1px']}/{a.reps} | {r['rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    v = res["versions"]
    a.out.with_suffix(".md").write_text(
        f"`{res['command']}` at {res['git']}: model {a.model} ({res['model_hash']}), {res['cpus']} CPUs, "
        f"{res['threads']} threads, "
        f"torch {v['torch']}, openvino {v['openvino']}, nncf {v['nncf']}; {a.reps} images per backend at batch 1 "
        f"after {a.warmup} warm-up, interleaved; loads: medians of {a.load_reps} rounds, each in a fresh process.\n\n"
        + table + "\n")


if __name__ == "__main__":
    main()
