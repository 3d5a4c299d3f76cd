"""SD3 distillation on the CPU: training speed of the CLI, the prompt-embedding cache, and the student round trip.

On the tiny SD3.5-Medium-structured fixture (flowflash.testing.sd3_fixture), for each size: full
`flowflash distill` runs (dmd2 4-step, flash 4-step, flash 2-step, dmd2 4-step --drop t5), each
ITERATIONS iterations at batch BATCH, critic_ratio default (5), log_every 1, no sample grids, no checkpoint
before the final one. Timing per run, from the run's log.jsonl:
  loop start  = time of step 1 - batch / img_s of step 1 (the loop's own clock starts there)
  start-up    = loop start - process start (imports, loading the roles, the embedding cache)
  loop        = time of the last step - loop start (the training loop only; s/it = loop / iterations)
  tail        = process end - time of the last step (final checkpoint, student export, exit)
Step durations are differences of consecutive log times; a row with grad_norm_student is a student update.
The embedding cache is keyed by teacher, prompts and dropped encoders: the first run of a key encodes, later
ones reuse it (the key does not hold the size, so the second size reuses both keys); it is also timed
in-process (prompt_bank, cold vs reused). Each student then draws 2 prompts x 2 seeds with
`flowflash generate` and, after `flowflash export`, with vanilla diffusers; the mean |difference| is in
0..255 units. Offline; everything temporary lives in one temp dir.

    .venv/bin/python scripts/bench_sd3_distill.py --sizes 256,64 --iterations 60 --batch-size 2 --threads 1 \
        --probe-threads 2 --out docs/bench/sd3-distill-cpu

--threads 1: on 2 shared cores, torch's default 2 threads slowed steps up to ~80x while other processes ran
(OpenMP threads waiting on a descheduled sibling); --probe-threads 2 repeats dmd2-4 at the default to show it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RUNS: list[tuple[str, str, int, list[str]]] = [  # (name, method, student steps, extra flags); order matters
    ("dmd2-4", "dmd2", 4, []),  # first of its cache key: encodes
    ("flash-4", "flash", 4, []),  # reuses dmd2-4's embeddings
    ("flash-2", "flash", 2, []),
    ("dmd2-4-no-t5", "dmd2", 4, ["--drop", "t5"]),  # another key: encodes (without T5)
]
CHECK_PROMPTS = ["a red apple on a white background", "a dog face painting"]
CHECK_SEEDS = [0, 1]  # consecutive: generate --num-images 2 --seed 0 draws both
PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]|^\s*$")


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("flowflash")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flowflash.cli"]


def write_prompts(path: Path, n: int = 32) -> list[str]:
    """n distinct short prompts of fixture words (the tiny tokenizers spell these whole)."""
    colors = ["red", "green", "blue", "yellow", "white", "black"]
    things = ["apple", "banana", "dog", "cat", "tree", "house", "car", "man", "woman", "emoji", "icon", "dog face"]
    styles = ["photo", "painting", "emoji style", "icon style"]
    pairs = [(colors[k * 7 % 72 % 6], things[k * 7 % 72 // 6]) for k in range(n)]  # 7 is prime to 72: distinct
    prompts = [f"the {t} on a {c} background" if k % 3 == 0 else f"a {c} {t} {styles[k % 4]}"
               for k, (c, t) in enumerate(pairs)]
    assert len(set(prompts)) == n <= 72
    path.write_text("\n".join(prompts) + "\n")
    return prompts


def noise_lines(*streams: str, skip: set[str] = frozenset()) -> list[str]:
    """What a run printed besides progress bars and its result path(s), each distinct line once."""
    out: list[str] = []
    for s in streams:
        for line in re.split(r"[\r\n]", s):
            line = line.strip()
            if line and not PROGRESS.search(line) and line not in skip and line not in out:
                out.append(line)
    return out


def run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str, str]:
    """(start, end) wall clock, stdout, stderr of one CLI call; a failure raises with its stderr."""
    start = time.time()
    p = subprocess.run(cli() + args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    end = time.time()
    if p.returncode:
        raise RuntimeError(f"flowflash {' '.join(args)} -> exit {p.returncode}\n{p.stderr[-3000:]}")
    return start, end, p.stdout, p.stderr


def loop_times(log: Path, batch: int, start: float, end: float, ratio: int) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "log_every 1 expected"
    t0 = rows[0]["time"] - batch / rows[0]["img_s"]
    times = [t0] + [r["time"] for r in rows]
    dur = [b - a for a, b in zip(times, times[1:])]
    student = [d for d, r in zip(dur, rows) if "grad_norm_student" in r]
    critic = [d for d, r in zip(dur, rows) if "grad_norm_student" not in r]
    warm = ratio + 1  # the first cycle: warm-up, left out of the steady-state medians
    steady_c = [d for d, r in zip(dur[warm:], rows[warm:]) if "grad_norm_student" not in r]
    steady_s = [d for d, r in zip(dur[warm:], rows[warm:]) if "grad_norm_student" in r]
    loop = times[-1] - t0
    return {"iterations": len(rows), "student_updates": len(student), "critic_updates": len(critic),
            "wall_s": end - start, "startup_s": t0 - start, "loop_s": loop, "tail_s": end - times[-1],
            "s_per_it": loop / len(rows), "s_per_student_update": loop / max(1, len(student)),
            "first_cycle_s": sum(dur[:warm]),
            "steady_s_per_it": (times[-1] - times[warm]) / (len(rows) - warm) if len(rows) > warm else None,
            "median_critic_step_s": statistics.median(steady_c) if steady_c else None,
            "median_student_step_s": statistics.median(steady_s) if steady_s else None,
            "first_step_s": dur[0],
            "last_losses": {k: v for k, v in rows[-1].items() if k not in ("step", "time", "img_s")}}


def diffusers_images(folder: Path, size: int, steps: int, no_t5: bool) -> tuple[dict, float, list[str]]:
    import warnings

    import numpy as np
    import torch
    from diffusers import StableDiffusion3Pipeline

    kw = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **kw)
        load_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for p in CHECK_PROMPTS:
        for s in CHECK_SEEDS:
            img = pipe(p, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
                       generator=torch.Generator().manual_seed(s)).images[0]
            out[(p, s)] = np.asarray(img).astype(np.float64)
    return out, load_s, sorted({str(w.message).splitlines()[0] for w in caught})


def check_student(student: Path, work: Path, size: int, steps: int, no_t5: bool) -> dict:
    """flowflash generate vs vanilla diffusers on the exported folder, same prompts and seeds."""
    import numpy as np
    from PIL import Image

    gen, noise, gen_s = {}, [], []
    for i, p in enumerate(CHECK_PROMPTS):  # one call per prompt: --num-images 2 draws seeds 0 and 1
        pngs = [work / f"gen-{i}-{k}.png" for k in range(len(CHECK_SEEDS))]
        a, b, so, se = run_cli(["generate", p, "--model", str(student), "--seed", str(CHECK_SEEDS[0]), "--num-images",
                                str(len(CHECK_SEEDS)), "--size", str(size), "-o", str(work / f"gen-{i}.png")])
        gen_s.append(b - a)
        noise += [ln for ln in noise_lines(so, se, skip={str(f) for f in pngs}) if " image(s) in " not in ln]
        for s, png in zip(CHECK_SEEDS, pngs):
            gen[(p, s)] = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
    exported = work / "exported"
    a, b, so, se = run_cli(["export", str(student), "--to", str(exported)])
    ref, load_s, warns = diffusers_images(exported, size, steps, no_t5)
    diffs = [{"prompt": p, "seed": s, "mean_abs_diff_255": float(np.abs(gen[(p, s)] - ref[(p, s)]).mean()),
              "max_abs_diff_255": float(np.abs(gen[(p, s)] - ref[(p, s)]).max())} for p, s in gen]
    res = {"images": diffs, "max_mean_abs_diff_255": max(d["mean_abs_diff_255"] for d in diffs),
           "generate_call_s": statistics.median(gen_s), "export_s": b - a, "diffusers_load_s": load_s,
           "diffusers_warnings": warns, "cli_noise": sorted(set(noise + noise_lines(so, se, skip={str(exported)})))}
    if no_t5:  # what a user who forgets the two None kwargs sees
        from diffusers import StableDiffusion3Pipeline
        try:
            StableDiffusion3Pipeline.from_pretrained(exported, local_files_only=True)
            res["diffusers_without_none_kwargs"] = "loads"
        except Exception as e:  # noqa: BLE001 - recorded, not handled
            res["diffusers_without_none_kwargs"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def cache_inprocess(teacher: Path, prompts: list[str], cache: Path) -> dict:
    """prompt_bank cold (encoders loaded, embeddings written) vs reused, in this (warm) process."""
    from flowflash.train.common import Dist
    from flowflash.train.latent_data import prompt_bank

    out = {}
    for name, drop in (("with_t5", frozenset()), ("no_t5", frozenset({"t5"}))):
        for state in ("cold", "reuse"):
            t = time.perf_counter()
            bank = prompt_bank(teacher, prompts, drop, 256, cache, Dist())
            out[f"{name}_{state}_s"] = time.perf_counter() - t
            assert bank.encoded_now == (state == "cold")
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# SD3 distillation on the CPU ({m['date']})", "",
             f"`{res['command']}`", "",
             f"Machine: {m['cpus']}-core CPU ({m['processor']}), torch {m['torch']} (threads per run in the "
             f"table, OMP_NUM_THREADS), diffusers {m['diffusers']}, Python {m['python']}. {res['noise_note']}", "",
             f"Fixture: tiny SD3.5-Medium-structured pipeline, {res['prompts']} prompts, {res['iterations']} "
             f"iterations at batch {res['batch_size']}, critic_ratio 5 (one student update per 6 iterations). "
             "s/it = training loop wall time (from log.jsonl times) / iterations; steady = after the first "
             "6-iteration cycle; s/student update = loop time / student updates; start-up = process start to "
             "loop start (incl. the embedding cache); tail = final checkpoint + export + exit. Image diff = "
             "max over 2 prompts x 2 seeds of the mean |flowflash generate - diffusers (exported)|, 0..255 "
             "(generate draws seeds 0 and 1 in one call: --num-images 2). The fixture is tiny: its step times are "
             "framework overhead rather than compute, and start-up (mostly importing torch, diffusers, transformers) "
             "outweighs a 60-iteration loop; not representative of a real SD3.5 checkpoint.", "",
             "| size | run | threads | wall s | start-up s | cache | loop s | s/it | steady s/it | critic step s | "
             "student step s | s/student update | first cycle s | tail s | image diff /255 (mean / max px) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, n=2: "-" if v is None else f"{v:.{n}f}"
    for r in res["runs"]:
        lines.append(f"| {r['size']} | {r['name']} | {r['threads']} | {f(r['wall_s'], 1)} | {f(r['startup_s'])} | {r['cache']} | "
                     f"{f(r['loop_s'], 1)} | {f(r['s_per_it'], 3)} | {f(r['steady_s_per_it'], 3)} | "
                     f"{f(r['median_critic_step_s'], 3)} | {f(r['median_student_step_s'], 3)} | "
                     f"{f(r['s_per_student_update'])} | {f(r['first_cycle_s'])} | {f(r['tail_s'])} | "
                     f"{f(r['check']['max_mean_abs_diff_255'], 4)} / {max(i['max_abs_diff_255'] for i in r['check']['images']):g} |")
    c = res["cache_inprocess"]
    lines += ["", "Embedding cache, in-process (`prompt_bank`, 32 prompts): "
              f"with T5 {c['with_t5_cold_s']:.2f} s cold / {c['with_t5_reuse_s']:.3f} s reused; "
              f"without T5 {c['no_t5_cold_s']:.2f} s / {c['no_t5_reuse_s']:.3f} s.",
              f"Student check: `flowflash generate` median {res['generate_call_s']:.1f} s per call (a new process, "
              "2 images), diffusers from_pretrained of the export median "
              f"{res['diffusers_load_s']:.2f} s.", f"Total benchmark time {res['total_s']:.0f} s.", ""]
    forgot = sorted({r["check"]["diffusers_without_none_kwargs"].split(":")[0] for r in res["runs"]
                     if "diffusers_without_none_kwargs" in r["check"]})
    if forgot:
        lines += [f"A --drop t5 export in diffusers without `text_encoder_3=None, tokenizer_3=None`: "
                  f"{', '.join(forgot)} (the export's README gives the two kwargs).", ""]
    if res["noise"]:
        lines += ["Printed by the CLI besides progress bars and result paths:", ""]
        lines += [f"- `{n}`" for n in res["noise"]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,64")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process (default: torch's)")
    ap.add_argument("--probe-threads", type=int, default=None,
                    help="also run the first size's dmd2-4 at this thread count (cache reused)")
    ap.add_argument("--out", type=Path, default=Path("docs/bench/sd3-distill-cpu"))
    a = ap.parse_args()
    t_all = time.perf_counter()

    if a.threads:  # before torch starts its pool; the CLI subprocesses inherit it
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import diffusers
    import torch
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # diffusers' own notes (accelerate missing) and loading bars, not the CLI's
    dlog.disable_progress_bar()
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    load_before = os.getloadavg()

    from flowflash.testing.sd3_fixture import write_tiny_sd3

    with tempfile.TemporaryDirectory(prefix="bench-sd3-distill-") as tmp:
        tmp = Path(tmp)
        teacher = write_tiny_sd3(tmp / "teacher", variant="sd3.5-medium")
        prompt_file = tmp / "prompts.txt"
        prompts = write_prompts(prompt_file)
        cfg = tmp / "cfg.yaml"
        cfg.write_text("log_every: 1\nsample_every: 0\nckpt_every: 1000000\n")
        runs, seen_keys = [], set()
        threads = str(a.threads or torch.get_num_threads())
        sizes = [int(s) for s in a.sizes.split(",")]
        plan = [(size, *run, threads) for size in sizes for run in RUNS]
        if a.probe_threads:
            plan.append((sizes[0], *RUNS[0], str(a.probe_threads)))
        for size, name, method, steps, extra, nthreads in plan:
            out = tmp / f"{name}-{size}-t{nthreads}"
            key = "no-t5" if "t5" in extra else "t5"
            args = ["distill", "--method", method, "--teacher", str(teacher), "--prompts", str(prompt_file),
                    "--student-steps", str(steps), "--iterations", str(a.iterations), "--out", str(out),
                    "--size", str(size), "--embed-cache", str(tmp / "cache"), "--batch-size", str(a.batch_size),
                    "--config", str(cfg), *extra]
            start, end, so, se = run_cli(args, {"OMP_NUM_THREADS": nthreads})
            r = {"size": size, "name": name, "method": method, "student_steps": steps, "flags": extra,
                 "threads": int(nthreads), "cache": "reuse" if key in seen_keys else "encode",
                 **loop_times(out / "log.jsonl", a.batch_size, start, end, 5),
                 "cli_noise": noise_lines(so, se, skip={str(out / "student")}), "loadavg_after": os.getloadavg()}
            seen_keys.add(key)
            print(f"{size} {name} ({nthreads} threads): wall {r['wall_s']:.1f} s, start-up {r['startup_s']:.2f} s, "
                  f"{r['s_per_it']:.3f} s/it", flush=True)
            r["check"] = check_student(out / "student", out, size, steps, "t5" in extra)
            print(f"  image diff max {r['check']['max_mean_abs_diff_255']:.4f}/255", flush=True)
            runs.append(r)
        cache = cache_inprocess(teacher, prompts, tmp / "cache-inprocess")

    cmd = (f"{Path(sys.executable).relative_to(Path.cwd()) if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable} "
           f"scripts/bench_sd3_distill.py --sizes {a.sizes} --iterations {a.iterations} "
           f"--batch-size {a.batch_size}{f' --threads {a.threads}' if a.threads else ''}"
           f"{f' --probe-threads {a.probe_threads}' if a.probe_threads else ''} --out {a.out}")
    noise = sorted({n for r in runs for n in r["cli_noise"] + r["check"]["cli_noise"]})
    res = {"command": cmd, "machine": {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "diffusers": diffusers.__version__,
        "python": platform.python_version(), "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": os.getloadavg()},
        "noise_note": "Timings are noisy: other work (a test suite) shared the cores; load average "
                      f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "prompts": len(prompts), "iterations": a.iterations, "batch_size": a.batch_size, "runs": runs,
        "cache_inprocess": cache, "noise": noise,
        "generate_call_s": statistics.median(r["check"]["generate_call_s"] for r in runs),
        "diffusers_load_s": statistics.median(r["check"]["diffusers_load_s"] for r in runs),
        "total_s": time.perf_counter() - t_all}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
