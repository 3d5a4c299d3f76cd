"""`flowflash merge`: interpolate two model folders at a given ratio, or choose the split-timestep merge
ratio by a sweep on alignment.

The sweep prompts are a fixed, seeded sample of the *training* split: choosing the ratio on the held-out
evaluation prompts would tune on the evaluation set.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import FlowflashError
from .generate import Setting, generate_set
from .prompt_set import sweep_prompt_set
from .results import write_results

if TYPE_CHECKING:
    from ..models.flow_model import FlowModel


def parse_ratios(spec: str) -> list[float]:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5]."""
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise FlowflashError(f"--sweep takes comma-separated numbers, got {spec!r}") from None


def check_ratios(ratios: list[float]):
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise FlowflashError(f"merge ratios must lie in [0, 1], got {ratios}")


def merge_sweep(a: FlowModel, b: FlowModel, ratios: list[float], data: Path, n_prompts: int = 256,
                seed: int = 0, judge=None, names: tuple[str, str] = ("A", "B")) -> dict:
    """Alignment (CLIP-score analogue, R-precision, compositional checks) of ratio * A + (1 - ratio) * B
    for each ratio (branches already loaded and checked), sampled with their own schedule and guidance;
    the best ratio by CLIP-score."""
    from ..methods.merge import merged
    from ..models.text import MiniLMEncoder
    from ..runtime.pipeline import Pipeline
    from .judge import Judge

    check_ratios(ratios)
    ps = sweep_prompt_set(data, n_prompts, seed)
    judge = judge or Judge.load()
    minilm = MiniLMEncoder(max_tokens=a.cfg.minilm_max_tokens)  # loaded once, shared by every merge
    rows = []
    for r in ratios:
        pipe = Pipeline.from_flow_model(merged(a, b, r), f"merge-{r:g}", minilm=minilm)
        imgs, _ = generate_set(Setting(name=f"ratio-{r:g}"), ps, seed=seed, pipe=pipe)
        feats = judge.features(imgs)
        rows.append({"setting": f"ratio {r:g}", "ratio": r, **judge.alignment(feats, ps.captions, ps.captions),
                     **judge.compositional(imgs, ps.rows)})
    best = max(rows, key=lambda x: x["clip_score"])
    return {"a": str(names[0]), "b": str(names[1]), "prompt_set": ps.name, "selected_by": "clip_score",
            "best_ratio": best["ratio"], "rows": rows}


def merge_models(a: str | Path, b: str | Path, output: str | Path, *, ratio: float | None = None,
                 sweep: str | list[float] | None = None, data: Path | None = None, n_prompts: int = 256,
                 report: Path | None = None) -> dict:
    """Write RATIO * A + (1 - RATIO) * B to `output`, with exactly one of a fixed `ratio` or the ratios
    to `sweep` (then `data` is the corpus whose training captions are sampled, and `report` an optional
    results stem). Returns {"ratio": the one written, "output", "sweep": the sweep's results or None}."""
    from ..methods.merge import check_branches, merged
    from ..models.flow_model import load_model, save_model

    if (ratio is None) == (sweep is None):
        raise FlowflashError("give exactly one of --ratio R or --sweep R1,R2,...")
    if sweep is not None:
        ratios = parse_ratios(sweep) if isinstance(sweep, str) else list(sweep)
        if not data:
            raise FlowflashError("--sweep needs --data (the corpus whose training captions it samples)")
    else:
        ratios = [ratio]
    check_ratios(ratios)
    ma, mb = load_model(Path(a)), load_model(Path(b))
    check_branches(ma, mb, str(a), str(b))
    res = None
    if sweep is not None:
        res = merge_sweep(ma, mb, ratios, Path(data), n_prompts, names=(str(a), str(b)))
        if report:
            write_sweep(res, Path(report))
    chosen = res["best_ratio"] if res else ratios[0]
    save_model(merged(ma, mb, chosen), Path(output))
    return {"ratio": chosen, "output": str(output), "sweep": res}


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
    """OUT.json, OUT.md and OUT.png."""
    write_results(res, out)
    plot_sweep(res, Path(out).with_suffix(".png"))
