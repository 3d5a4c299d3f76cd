"""`flowflash bench`: several settings in one run, interleaved repetitions, medians and ratios."""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import FlowflashError
from .generate import Setting

KEYS = {"model", "steps", "guidance", "minilm", "precision", "backend", "lowmem", "threads", "style"}
BACKENDS = ("torch", "openvino", "openvino-int8", "openvino-int4")


def parse_setting(spec: str) -> Setting:
    """'NAME=model:teacher,steps:4,guidance:1' (also '=' inside: 'steps=4')."""
    if "=" not in spec.split(",")[0] and ":" not in spec:
        raise FlowflashError(f"setting {spec!r} must look like NAME=model:teacher,steps:4,guidance:1")
    name, _, rest = spec.partition("=")
    kw: dict = {}
    for part in filter(None, rest.split(",")):
        k, sep, v = part.replace("=", ":", 1).partition(":")
        if not sep or k not in KEYS:
            raise FlowflashError(f"setting {name!r}: unknown option {k!r} (known: {', '.join(sorted(KEYS))})")
        try:
            flag = lambda s: s.lower() in ("1", "true", "yes", "on")
            kw[k] = {"steps": int, "guidance": float, "minilm": flag, "lowmem": flag, "threads": int,
                     "model": str, "precision": str, "backend": str, "style": flag}[k](v)
        except ValueError:
            raise FlowflashError(f"setting {name!r}: bad value for {k}: {v!r}") from None
    if not name:
        raise FlowflashError(f"setting {spec!r} has no name")
    if kw.get("precision", "fp32") not in ("fp32", "bf16"):
        raise FlowflashError(f"setting {name!r}: precision must be fp32 or bf16, got {kw['precision']!r}")
    if kw.get("backend", "torch") not in BACKENDS:
        raise FlowflashError(f"setting {name!r}: backend must be one of {', '.join(BACKENDS)}, got {kw['backend']!r}")
    if not kw.pop("minilm", True):
        kw["drop"] = ("minilm",)
    if "lowmem" in kw:
        kw["low_memory"] = kw.pop("lowmem")
    if "style" in kw:  # style:0 draws prompts as typed
        kw["complete_style"] = kw.pop("style")
    return Setting(name=name, **kw)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def own_peak_rss_mb() -> float:
    """This process image's own peak RSS (VmHWM of /proc/self/status where there is one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def pipe_key(s: Setting) -> tuple:
    """Settings that differ only in steps or guidance share one loaded Pipeline."""
    return (s.model, s.drop, s.precision, s.backend, s.low_memory)


def time_settings(settings: list[Setting], prompt: str, reps: int = 5, warmup: int = 1, batch: int = 1,
                  pipes: dict | None = None) -> dict:
    """Median per-phase seconds per image for each setting, repetitions interleaved across settings so that
    machine noise hits all of them alike. The loaded pipelines are left in `pipes` (by pipe_key) for reuse."""
    pipes = {} if pipes is None else pipes
    for s in settings:
        if pipe_key(s) not in pipes:
            pipes[pipe_key(s)] = s.load()
    runs: dict[str, list] = {s.name: [] for s in settings}
    total = (warmup + reps) * len(settings)
    with tqdm(total=total, desc="bench", leave=False) as bar:
        for r in range(warmup + reps):
            for s in settings:
                pipe = pipes[pipe_key(s)]
                threads = torch.get_num_threads()
                if s.threads:
                    torch.set_num_threads(s.threads)
                t0 = time.perf_counter()
                gen = pipe.run([prompt] * batch, list(range(batch)), steps=s.steps, guidance=s.guidance)
                wall = time.perf_counter() - t0
                torch.set_num_threads(threads)
                if r >= warmup:
                    t = gen.timings
                    runs[s.name].append((t.text_s / batch, t.denoise_s / batch, t.decode_s / batch, wall / batch,
                                         gen.params.steps, gen.params.guidance))
                bar.update(1)
    out = {}
    for s in settings:
        rows = runs[s.name]
        med = lambda i: statistics.median(r[i] for r in rows)
        out[s.name] = {"text_s": med(0), "denoise_s": med(1), "decode_s": med(2), "sec_per_image": med(3),
                       "steps": rows[0][4], "guidance": rows[0][5], "reps": reps, "model": s.model,
                       "minilm": s.minilm, "precision": s.precision, **({} if s.complete_style else {"as_typed": True})}
    return out


def peak_rss_of(setting: Setting, prompt: str) -> float:
    """Peak RSS (MB) of a fresh process that loads the setting and makes one image: per-setting memory,
    which one shared bench process cannot tell apart."""
    import json
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: on Linux a child's ru_maxrss keeps the parent's high-water mark across
    # fork + exec, so a probe started from a big bench process would report the bench's size.
    code = ("import json,sys;from flowflash.eval.bench import own_peak_rss_mb;"
            "from flowflash.runtime.pipeline import Pipeline;"
            "from flowflash.eval.generate import Setting;"
            "a=json.loads(sys.argv[1]);p=Setting(**a['setting']).load();"
            "p.generate(a['prompt'],steps=a['steps'],guidance=a['guidance']);"
            "print(own_peak_rss_mb())")
    import dataclasses
    arg = json.dumps({"setting": dataclasses.asdict(setting), "prompt": prompt, "steps": setting.steps,
                      "guidance": setting.guidance})
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FlowflashError(f"memory probe for {setting.name!r} failed: {proc.stderr.strip().splitlines()[-1]}")
    return float(proc.stdout.strip().splitlines()[-1])


def model_file_mb(setting: Setting) -> float | None:
    """Bytes of the setting's weight files (a flowflash model folder), in MB; None for other kinds."""
    from ..models.storage import weight_files
    from ..runtime.pipeline import resolve_model

    try:
        files = weight_files(resolve_model(setting.model))
    except FlowflashError:
        return None
    return sum(p.stat().st_size for p in files) / 1e6 if files else None


def cold_seconds(settings: list[Setting], prompt: str, reps: int = 3) -> tuple[dict[str, float], float]:
    """Median wall seconds of a fresh `flowflash generate` process making one image, per setting, and of
    `python -c "import torch"` beside them (repetitions interleaved): the wait a person feels."""
    import subprocess
    import sys
    import tempfile

    def wall(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise FlowflashError(f"cold run {' '.join(cmd[2:5])} failed: {proc.stderr.strip()[-300:]}")
        return dt

    runs: dict[str, list[float]] = {s.name: [] for s in settings}
    torch_runs: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in tqdm(range(reps), desc="cold starts", leave=False):
            torch_runs.append(wall([sys.executable, "-c", "import torch"]))
            for s in settings:
                cmd = [sys.executable, "-m", "flowflash.cli", "generate", prompt, "--model", s.model,
                       "--dtype", s.precision, "-o", f"{tmp}/{s.name}.png"]
                cmd += [] if s.steps is None else ["--steps", str(s.steps)]
                cmd += [] if s.guidance is None else ["--guidance", str(s.guidance)]
                cmd += [a for d in s.drop for a in ("--drop", d)]
                if s.backend != "torch":
                    backend, _, ov = s.backend.partition("-")
                    cmd += ["--backend", backend] + (["--ov-weights", ov] if ov else [])
                cmd += ["--low-memory"] if s.low_memory else []
                cmd += ["--threads", str(s.threads)] if s.threads else []
                runs[s.name].append(wall(cmd))
    return {k: statistics.median(v) for k, v in runs.items()}, statistics.median(torch_runs)


def plot_bench(rows: list[dict], baseline: str, out: Path):
    """OUT-latency.png and OUT-quality_vs_steps.png next to the results (one pair per bench run)."""
    out_dir = out.parent
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r["setting"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.5))
    ax.bar(names, [r["sec_per_image"] for r in rows], color="tab:blue")
    ax.set_ylabel("seconds / image (median)")
    ax.set_title(f"latency (2 CPU cores); speed-up vs {baseline} on top")
    for i, r in enumerate(rows):
        ax.text(i, r["sec_per_image"], f"{r.get('speedup', 1):.1f}x", ha="center", va="bottom", fontsize=8)
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out_dir / f"{out.name}-latency.png", dpi=100)
    plt.close(fig)
    q = [r for r in rows if "fd_effnetl0" in r]
    if q:
        fig, axs = plt.subplots(1, 2, figsize=(9, 3.5))
        for model in dict.fromkeys(r["model"] for r in q):
            pts = sorted((r["steps"], r["fd_effnetl0"], r["clip_score"]) for r in q if r["model"] == model)
            axs[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=model)
            axs[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=model)
        for a, yl in zip(axs, ["FD-EffNetL0 (lower is better)", "CLIP-score analogue (higher is better)"]):
            a.set_xscale("log")
            a.set_xlabel("sampling steps")
            a.set_ylabel(yl)
            a.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{out.name}-quality_vs_steps.png", dpi=100)
        plt.close(fig)
