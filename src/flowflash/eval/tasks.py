"""The judge / eval / bench verbs as library functions: typed arguments in, result dicts out. They write
the result files they are asked for and print nothing (the CLI prints)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import FlowflashError
from .generate import Setting, generate_set
from .image_sets import read_image_folder, real_images, save_image_folder
from .metrics import mean_and_se
from .prompt_set import DEFAULT_PROMPTS, PromptSet, load_prompt_set
from .results import write_results
from .score import score

if TYPE_CHECKING:  # the judge pulls EfficientNet and MiniLM: imported when first used
    from .judge import Judge

PromptSource = str | Path | None  # a packaged prompt-set name, a JSONL path, or None for eval_v1


@dataclass
class Reference:
    """What every image set of one run is scored against, loaded once: the prompt set, the judge and
    the features of the corpus's own held-out images."""
    ps: PromptSet
    judge: Judge
    real_feats: torch.Tensor


def load_reference(data: Path, prompts: PromptSource = None) -> Reference:
    from .judge import Judge

    ps = load_prompt_set(prompts or DEFAULT_PROMPTS)
    judge = Judge.load()
    return Reference(ps, judge, judge.features(real_images(data, ps)))


def validate_judge(data: Path, prompts: PromptSource, out: Path) -> dict:
    """The instruments on real held-out images: the numbers any generated result must be read against.
    Writes OUT.json / OUT.md; returns the row."""
    from .judge import Judge
    from .metrics import frechet_distance

    ps = load_prompt_set(prompts or DEFAULT_PROMPTS)
    judge = Judge.load()
    real = real_images(data, ps)
    feats = judge.features(real)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(real), generator=g)
    half = len(real) // 2
    res = {"setting": "real held-out", "n_images": len(real),
           "fd_floor_halves": frechet_distance(feats[perm[:half]], feats[perm[half:]])}
    res.update(judge.alignment(feats, ps.captions, ps.captions))
    shuffled = [ps.captions[i] for i in torch.randperm(len(real), generator=g)]
    res["clip_score_shuffled"] = judge.alignment(feats, shuffled, ps.captions)["clip_score"]
    res.update(judge.compositional(real, ps.rows))
    write_results({"prompt_set": ps.name, "prompt_set_sha": ps.sha, "rows": [res]}, out)
    return res


def setting_columns(s: Setting) -> dict:
    cols = {"model": s.model, "steps": s.steps, "guidance": s.guidance, "minilm": s.minilm}
    if not s.complete_style:  # said only when off: rows of runs that completed stay as they were
        cols["as_typed"] = True
    return cols


def setting_images(setting: Setting, ps: PromptSet, seed: int = 0, cache: Path | None = None,
                   pipe=None) -> tuple[torch.Tensor, dict]:
    """The setting's images and its timing columns; no timing columns for a set read from the cache."""
    t0 = time.perf_counter()
    images, timings = generate_set(setting, ps, seed=seed, cache=cache, pipe=pipe)
    if timings is None:
        return images, {}
    return images, {**timings, "sec_per_image": (time.perf_counter() - t0) / len(images)}


def score_source(source: Setting | Path, ref: Reference, seed: int = 0,
                 cache: Path | None = None) -> tuple[dict, torch.Tensor]:
    """One result row (and its images) for a setting's images at `seed`, or for a folder of images."""
    if isinstance(source, Setting):
        images, timing = setting_images(source, ref.ps, seed=seed, cache=cache)
        name, columns = source.name, setting_columns(source)
    else:
        images, timing = read_image_folder(source, len(ref.ps.rows)), {}
        name, columns = Path(source).name, {}
    res, _ = score(images, ref.ps, ref.judge, ref.real_feats)
    return {"setting": name, **columns, **res, **timing}, images


def evaluate(source: Setting | Path, data: Path, prompts: PromptSource = None, out: Path | None = None, *,
             seed: int = 0, save_images: Path | None = None, cache: Path | None = None) -> dict:
    """Score a setting's generated images, or a folder of images (00000.png, ... in prompt order), on
    the prompt set. Writes OUT.json / OUT.md when `out` is given; returns the result row."""
    ref = load_reference(data, prompts)  # a missing judge or corpus fails before any generation
    row, images = score_source(source, ref, seed, cache)
    if save_images:
        save_image_folder(images, save_images)
    if out:
        write_results({"prompt_set": ref.ps.name, "prompt_set_sha": ref.ps.sha, "seed": seed, "rows": [row]}, out)
    return row


# the metrics whose mean and standard error over seeds an evaluate_seeds run reports
SEED_METRICS = ("fd_effnetl0", "kid_effnetl0", "clip_score", "r_precision", "compositional_acc")


def evaluate_seeds(setting: Setting, data: Path, prompts: PromptSource = None, out: Path | None = None, *,
                   seeds: list[int], save_images: Path | None = None, cache: Path | None = None) -> list[dict]:
    """`evaluate` for each seed (the judge and the real features loaded once), then a row of their means, each with
    its standard error over the seeds (`<metric>_se`). Returns the per-seed rows, then the mean row."""
    if len(seeds) < 2:
        raise FlowflashError(f"evaluate_seeds needs at least two seeds, got {seeds}")
    ref = load_reference(data, prompts)
    rows = []
    for seed in seeds:
        row, images = score_source(setting, ref, seed, cache)
        rows.append({**row, "setting": f"{setting.name} seed {seed}", "seed": seed})
        if save_images:
            save_image_folder(images, Path(save_images) / f"seed-{seed}")
    mean = {"setting": f"{setting.name} mean of {len(seeds)}", **setting_columns(setting), "seeds": list(seeds)}
    for k in SEED_METRICS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if len(vals) == len(rows):
            mean[k], mean[f"{k}_se"] = mean_and_se(vals)
    rows.append(mean)
    if out:
        write_results({"prompt_set": ref.ps.name, "prompt_set_sha": ref.ps.sha, "seeds": list(seeds), "rows": rows}, out)
    return rows


def check_bench(settings: list[Setting], baseline: str | None, quality: bool, data: Path | None) -> str:
    """Every input problem before any work; returns the baseline's name."""
    from ..runtime.pipeline import resolve_model

    names = [s.name for s in settings]
    if not names:
        raise FlowflashError("bench needs at least one setting")
    if len(set(names)) != len(names):
        raise FlowflashError(f"setting names must be unique: {names}")
    baseline = baseline or names[0]
    if baseline not in names:
        raise FlowflashError(f"baseline {baseline!r} is not one of the settings: {names}")
    if quality and not data:
        raise FlowflashError("--quality needs --data (the corpus with the real held-out images)")
    for s in settings:
        resolve_model(s.model)  # an unknown model fails here, not after minutes of timing
    return baseline


def bench(settings: list[Setting], prompt: str, out: Path, *, baseline: str | None = None, reps: int = 5,
          memory: bool = False, quality: bool = False, data: Path | None = None, prompts: PromptSource = None,
          cache: Path | None = None, cold: int = 0) -> dict:
    """Speed of each setting (interleaved repetitions, medians, speed-up against the baseline), with
    `memory` each one's peak RSS in a fresh process, with `cold` > 0 the median wall time of that many fresh
    one-image `flowflash generate` processes (beside `import torch`'s), with `quality` its scores on the
    prompt set; each model folder's weight bytes always.
    Writes OUT.json, OUT.md and the plots next to OUT; returns the results (rows in setting order)."""
    from .bench import cold_seconds, model_file_mb, peak_rss_mb, peak_rss_of, pipe_key, plot_bench, time_settings

    baseline = check_bench(settings, baseline, quality, data)
    pipes: dict = {}  # loaded once, for timing and then for the quality set
    speed = time_settings(settings, prompt, reps=reps, pipes=pipes)
    rows = [{"setting": s.name, **speed[s.name], "file_mb": model_file_mb(s)} for s in settings]
    extra = {}
    if cold:
        colds, extra["import_torch_s"] = cold_seconds(settings, prompt, cold)
        for s, r in zip(settings, rows):
            r["cold_s"] = colds[s.name]
            r["cold_vs_import_torch"] = colds[s.name] / extra["import_torch_s"]
    if memory:
        for s, r in zip(settings, rows):
            r["peak_rss_mb"] = peak_rss_of(s, prompt)
    for r in rows:
        r["speedup"] = speed[baseline]["sec_per_image"] / r["sec_per_image"]
    if quality:
        ref = load_reference(Path(data), prompts)
        feats: dict[str, torch.Tensor] = {}
        for s, r in zip(settings, rows):
            images, _ = setting_images(s, ref.ps, cache=cache, pipe=pipes[pipe_key(s)])
            # FD to the baseline's images too, once they exist (the baseline may come later)
            refs = {baseline: feats[baseline]} if baseline in feats else None
            res, feats[s.name] = score(images, ref.ps, ref.judge, ref.real_feats, refs)
            r.update(res)  # steps/guidance stay the ones the timing run actually used
    results = {"baseline": baseline, "bench_process_peak_rss_mb": peak_rss_mb(), "reps": reps, "prompt": prompt,
               **extra, "rows": rows}
    write_results(results, out)
    plot_bench(rows, baseline, Path(out))
    return results
