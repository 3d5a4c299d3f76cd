"""Choose the split-timestep merge ratio by a sweep on alignment.

The sweep prompts are a fixed, seeded sample of the *training* split: choosing the ratio on the held-out
evaluation prompts would tune on the evaluation set.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..distill.merge import merged
from ..errors import FlowflashError
from ..models.flow_model import FlowModel
from .run import PromptSet, Setting, generate_set


def sweep_prompt_set(data: Path, n: int = 256, seed: int = 0) -> PromptSet:
    from ..data.dataset import read_manifest
    rows = [r for r in read_manifest(data) if r["split"] == "train"]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    return PromptSet(f"train-sample-{len(rows)}-seed{seed}", "-", rows)


def merge_sweep(a: FlowModel, b: FlowModel, ratios: list[float], data: Path, n_prompts: int = 256,
                seed: int = 0, judge=None, names: tuple[str, str] = ("A", "B")) -> dict:
    """Alignment (CLIP-score analogue, R-precision, compositional checks) of ratio * A + (1 - ratio) * B
    for each ratio (branches already loaded and checked), sampled with their own schedule and guidance;
    the best ratio by CLIP-score."""
    from ..models.text import MiniLMEncoder, TextConditioner, WordTokenizer
    from ..runtime.pipeline import Pipeline
    from .judge import Judge

    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise FlowflashError(f"merge ratios must lie in [0, 1], got {ratios}")
    ps = sweep_prompt_set(data, n_prompts, seed)
    judge = judge or Judge.load()
    minilm = MiniLMEncoder(max_tokens=a.cfg.minilm_max_tokens)
    rows = []
    for r in ratios:
        m = merged(a, b, r)
        pipe = Pipeline(m, Path(names[0]))  # the path only names it; nothing is written
        pipe.cond = TextConditioner(WordTokenizer(m.cfg.vocab), m.light, minilm, m.cfg.minilm_max_tokens)
        imgs, _ = generate_set(Setting(name=f"ratio-{r:g}"), ps, seed=seed, pipe=pipe)
        feats = judge.features(imgs)
        row = {"setting": f"ratio {r:g}", "ratio": r, **judge.alignment(feats, ps.captions, ps.captions),
               **judge.compositional(imgs, ps.rows)}
        rows.append(row)
    best = max(rows, key=lambda x: x["clip_score"])
    return {"a": str(names[0]), "b": str(names[1]), "prompt_set": ps.name, "selected_by": "clip_score",
            "best_ratio": best["ratio"], "rows": rows}


def plot_sweep(res: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res["rows"], key=lambda r: r["ratio"])
    x = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
    for a, key, label in zip(ax, ("clip_score", "r_precision", "compositional_acc"),
                             ("CLIP-score analogue", "R-precision@10", "compositional acc.")):
        a.plot(x, [r[key] if r[key] is not None else np.nan for r in rows], "o-")
        a.axvline(res["best_ratio"], color="gray", ls="--", lw=1)
        a.set_xlabel("merge ratio (weight of branch A)")
        a.set_ylabel(label)
    fig.suptitle(f"merge sweep: {Path(res['a']).parent.name} (A) vs {Path(res['b']).parent.name} (B)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_sweep(res: dict, out: Path):
    from .run import write_results
    write_results(res, out)
    plot_sweep(res, Path(out).with_suffix(".png"))
