"""The eval/bench/judge verbs as Python functions (the CLI only parses arguments and calls these)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import FlowflashError
from .run import (DEFAULT_PROMPTS, Setting, generate_set, load_prompt_set, markdown_table, read_image_folder,
                  real_images, score, write_results)


def validate_judge(data: Path, prompts: Path | None, out: Path) -> dict:
    """The instruments on real held-out images: the numbers any generated result must be read against."""
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
    results = {"prompt_set": ps.name, "prompt_set_sha": ps.sha, "rows": [res]}
    write_results(results, out)
    return res


def judge(a) -> int:
    if a.judge_cmd == "build":
        from .judge import JUDGE_DIR, build_judge
        info = build_judge(Path(a.data))
        print(f"judge built from {info['n_train_images']} training images, {info['n_crops']} crops -> {JUDGE_DIR}")
    else:
        res = validate_judge(Path(a.data), a.prompts, Path(a.out))
        print(json.dumps(res, indent=1))
    return 0


def evaluate_setting(setting: Setting | None, data: Path, prompts: Path | None, out: Path | None,
                     images: Path | None = None, seed: int = 0, save_images: Path | None = None,
                     judge=None, real_feats=None, ref_feats: dict | None = None, cache: Path | None = None,
                     pipe=None) -> dict:
    from .judge import Judge

    ps = load_prompt_set(prompts or DEFAULT_PROMPTS)
    judge = judge or Judge.load()
    if real_feats is None:
        real_feats = judge.features(real_images(data, ps))
    timings = None
    if images is not None:
        imgs = read_image_folder(images, len(ps.rows))
        name = Path(images).name
    else:
        t0 = time.perf_counter()
        imgs, timings = generate_set(setting, ps, seed=seed, cache=cache, pipe=pipe)
        if not timings.pop("cached", False):
            timings["sec_per_image"] = (time.perf_counter() - t0) / len(imgs)
        name = setting.name
    res, feats = score(imgs, ps, judge, real_feats, ref_feats)
    res = {"setting": name, **({"model": setting.model, "steps": setting.steps, "guidance": setting.guidance,
                                "minilm": setting.minilm} if setting else {}), **res, **(timings or {})}
    if save_images:
        from PIL import Image
        Path(save_images).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(im).save(Path(save_images) / f"{i:05d}.png")
    if out:
        write_results({"prompt_set": ps.name, "prompt_set_sha": ps.sha, "seed": seed, "rows": [res]}, out)
    res["_feats"] = feats
    return res


def evaluate(a) -> int:
    setting = None if a.images else Setting(name=f"{Path(a.model).name}-{a.steps or 'default'}",
                                            model=a.model, steps=a.steps, guidance=a.guidance,
                                            minilm=not a.no_minilm)
    res = evaluate_setting(setting, Path(a.data), a.prompts, Path(a.out), images=a.images, seed=a.seed,
                           save_images=a.save_images, cache=a.cache)
    res.pop("_feats")
    print(markdown_table([res]))
    return 0


def bench(a) -> int:
    from .bench import parse_setting, peak_rss_mb, peak_rss_of, pipe_key, plot_bench, time_settings

    settings = [parse_setting(s) for s in a.setting]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise FlowflashError(f"setting names must be unique: {names}")
    baseline = a.baseline or names[0]
    if baseline not in names:
        raise FlowflashError(f"baseline {baseline!r} is not one of the settings: {names}")
    if a.quality and not a.data:
        raise FlowflashError("--quality needs --data (the corpus with the real held-out images)")
    from ..runtime.pipeline import resolve_model
    for s in settings:
        resolve_model(s.model)  # fail on an unknown model before any work
    pipes: dict = {}  # loaded once, for timing and then for the quality set
    speed = time_settings(settings, a.prompt, reps=a.reps, pipes=pipes)
    rows = [{"setting": n, **speed[n]} for n in names]
    if a.memory:
        for s, r in zip(settings, rows):
            r["peak_rss_mb"] = peak_rss_of(s, a.prompt)
    base = speed[baseline]["sec_per_image"]
    for r in rows:
        r["speedup"] = base / r["sec_per_image"]
    if a.quality:
        from .judge import Judge
        ps = load_prompt_set(a.prompts or DEFAULT_PROMPTS)
        judge = Judge.load()
        real_feats = judge.features(real_images(Path(a.data), ps))
        feats = {}
        for s, r in zip(settings, rows):
            ref = {baseline: feats[baseline]} if baseline in feats else None
            q = evaluate_setting(s, Path(a.data), a.prompts, None, judge=judge, real_feats=real_feats, ref_feats=ref,
                                 cache=a.cache, pipe=pipes[pipe_key(s)])
            feats[s.name] = q.pop("_feats")
            r.update({k: v for k, v in q.items() if k not in ("sec_per_image", "text_s", "denoise_s", "decode_s")})
    out = Path(a.out)
    results = {"baseline": baseline, "bench_process_peak_rss_mb": peak_rss_mb(), "reps": a.reps, "prompt": a.prompt, "rows": rows}
    write_results(results, out)
    plot_bench(rows, baseline, out)
    print(markdown_table(rows, baseline))
    print(f"speed-up vs {baseline}: " + ", ".join(f"{r['setting']} {r['speedup']:.1f}x" for r in rows))
    return 0
