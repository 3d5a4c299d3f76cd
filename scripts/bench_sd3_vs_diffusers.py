"""flowflash vs diffusers on the same SD3 checkpoint, same seeds and settings, repetitions interleaved in one run.

Per image end to end, split into text encoders / transformer / VAE (diffusers' parts are timed with forward
hooks on its modules; flowflash's come from its Generation timings), median of the repetitions; every
repetition has a prompt of its own (a reused flowflash Pipeline keeps the embeddings of recent prompts, so a
repeated prompt would flatter it); load times are medians of 3 alternating loads; with --memory each side's
peak RSS (VmHWM) in a fresh process; with --no-t5 both sides run without T5 as well.

    python scripts/make_sd3_fixture.py runs/sd3-fixture --sample-size 32
    python scripts/bench_sd3_vs_diffusers.py --model runs/sd3-fixture --size 256 --reps 5 --memory \
        --out docs/bench/sd3-vs-diffusers
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a red apple on a wooden table, studio light"
CASES = [("4 steps, no CFG", 4, 1.0), ("28 steps, CFG 5", 28, 5.0)]


class Clock:
    """Seconds spent inside chosen modules' forward calls (hooks), reset per image."""

    def __init__(self, parts: dict):
        import time as _t
        self.t, self.acc, self.start = _t, {k: 0.0 for k in parts}, {}
        for name, mods in parts.items():
            for m in mods:
                m.register_forward_pre_hook(lambda *_, n=name: self.start.__setitem__(n, self.t.perf_counter()))
                m.register_forward_hook(lambda *_, n=name: self.acc.__setitem__(
                    n, self.acc[n] + self.t.perf_counter() - self.start[n]))

    def take(self) -> dict:
        out, self.acc = self.acc, {k: 0.0 for k in self.acc}
        return out


def load_diffusers(model: Path, t5: bool):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging
    logging.set_verbosity_error()
    kw = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(model, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(seed: int, steps: int) -> str:
    return f"{PROMPT}, take {seed} of {steps}"  # new to both sides' every call


def run_diffusers(pipe, clock, size, steps, guidance, seed):
    import torch
    t0 = time.perf_counter()
    pipe(prompt(seed, steps), num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
         generator=torch.Generator().manual_seed(seed))
    total = time.perf_counter() - t0
    parts = clock.take()
    return {"total_s": total, "text_s": parts["text"], "transformer_s": parts["transformer"], "vae_s": parts["vae"]}



def run_flowflash(pipe, size, steps, guidance, seed):
    t0 = time.perf_counter()
    gen = pipe.run([prompt(seed, steps)], [seed], steps=steps, guidance=guidance, size=size)
    total = time.perf_counter() - t0
    return {"total_s": total, "text_s": gen.timings.text_s, "transformer_s": gen.timings.denoise_s,
            "vae_s": gen.timings.decode_s}


def peak_rss(model: Path, side: str, t5: bool, size: int) -> float:
    """Peak RSS (MB) of a fresh process that loads one side and draws one 4-step image."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import bench_sd3_vs_diffusers as b
from pathlib import Path
m = Path({str(model)!r})
if {side!r} == "diffusers":
    p = b.load_diffusers(m, {t5})
    p(b.PROMPT, num_inference_steps=4, guidance_scale=1.0, height={size}, width={size}, generator=torch.Generator().manual_seed(0))
else:
    from flowflash.runtime.pipeline import Pipeline
    Pipeline.load(m, drop=() if {t5} else ("t5",)).run([b.PROMPT], [0], steps=4, guidance=1.0, size={size})
# VmHWM, not ru_maxrss: the latter keeps the parent's high-water mark across fork + exec
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--no-t5", action="store_true", help="also compare both sides without T5")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compile", action="store_true", help="flowflash's side with --compile (diffusers' stays eager "
                    "unless --compile-diffusers)")
    ap.add_argument("--compile-diffusers", action="store_true", help="torch.compile diffusers' transformer too")
    ap.add_argument("--compile-vae", action="store_true",
                    help="with --compile, also compile flowflash's VAE decoder (what `--compile` does on CUDA only)")
    a = ap.parse_args()

    from flowflash.runtime.pipeline import Pipeline

    rows = []
    load_diffusers(a.model, True), Pipeline.load(a.model)  # imports and file caches warm for both sides
    for t5 in ([True, False] if a.no_t5 else [True]):
        loads = {"flowflash": [], "diffusers": []}
        for _ in range(3):
            t0 = time.perf_counter()
            ours = Pipeline.load(a.model, drop=() if t5 else ("t5",), compile=a.compile)
            if a.compile_vae:
                ours.model.vae.decoder.compile()
            loads["flowflash"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = load_diffusers(a.model, t5)
            if a.compile_diffusers:
                theirs.transformer.compile()
            loads["diffusers"].append(time.perf_counter() - t0)
        load_ours, load_theirs = statistics.median(loads["flowflash"]), statistics.median(loads["diffusers"])
        encoders = [m for m in (theirs.text_encoder, theirs.text_encoder_2, theirs.text_encoder_3) if m is not None]
        clock = Clock({"text": encoders, "transformer": [theirs.transformer], "vae": [theirs.vae.decoder]})
        for label, steps, guidance in CASES:
            run_flowflash(ours, a.size, steps, guidance, -1), run_diffusers(theirs, clock, a.size, steps, guidance, -1)
            f, d = [], []
            for r in range(a.reps):  # interleaved, so drift in the machine hits both sides alike
                f.append(run_flowflash(ours, a.size, steps, guidance, r))
                d.append(run_diffusers(theirs, clock, a.size, steps, guidance, r))
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            row = {"case": label + ("" if t5 else ", no T5"), "size": a.size, "reps": a.reps, "t5": t5,
                   "load_s": {"flowflash": load_ours, "diffusers": load_theirs}}
            for k in ("total_s", "text_s", "transformer_s", "vae_s"):
                row[k] = {"flowflash": med(f, k), "diffusers": med(d, k)}
            row["ratio"] = row["total_s"]["flowflash"] / row["total_s"]["diffusers"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if a.memory:
            mem = {side: peak_rss(a.model, side, t5, a.size) for side in ("flowflash", "diffusers")}
            for r in rows:
                if r["t5"] == t5:
                    r["peak_rss_mb"] = mem
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"model": str(a.model), "prompt": PROMPT, "rows": rows}, indent=1))
    lines = ["| case | flowflash s/image | diffusers s/image | ratio | text (ff / diff) | transformer | VAE | load s (ff / diff) | peak RSS MB (ff / diff) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = lambda k: f"{r[k]['flowflash']:.3f} / {r[k]['diffusers']:.3f}"
        mem = f"{r['peak_rss_mb']['flowflash']:.0f} / {r['peak_rss_mb']['diffusers']:.0f}" if "peak_rss_mb" in r else "—"
        lines.append(f"| {r['case']} | {r['total_s']['flowflash']:.3f} | {r['total_s']['diffusers']:.3f} | "
                     f"{r['ratio']:.2f}x | {p('text_s')} | {p('transformer_s')} | {p('vae_s')} | "
                     f"{r['load_s']['flowflash']:.2f} / {r['load_s']['diffusers']:.2f} | {mem} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
