"""`flowflash grid`: one image per prompt of a prompt list, drawn as a grid; optionally scored for
single-emoji recognition against the corpus."""
from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from ..errors import FlowflashError
from ..fsutil import write_text_atomic
from ..images import image_grid, pil_to_u8
from .prompt_set import load_prompt_lines
from .score import score_singles


def check_corpus(data: Path):
    if not (Path(data) / "manifest.jsonl").exists():
        raise FlowflashError(f"--score: no corpus at {data} (no manifest.jsonl); build it with: "
                             f"flowflash data build --out {data}")


def score_grid(images: list[Image.Image], prompts: list[str], data: Path, judge) -> dict:
    """Recognition ranks of the single-emoji prompts' images (see score_singles)."""
    return score_singles(pil_to_u8(images), prompts, Path(data), judge)


def draw_grid(prompts: str | Path, output: str, *, model: str | None = None, steps: int | None = None,
              guidance: float | None = None, seed: int = 0, cols: int = 8, score: Path | None = None,
              timesteps: list[float] | None = None, complete_style: bool = True) -> dict:
    """Draw every prompt of a prompt list (a packaged name such as `grid64`, or a file) with one seed
    into one PNG, each as `generate` draws it (complete_style=False: as typed). With `score` (a corpus), also
    write OUT.json with the recognition ranks (of the prompts as typed).
    Returns {"path", "n_prompts", "seconds" (generation only), "json" and "scores" when scored}."""
    from ..runtime.output import output_paths, save_png
    from ..runtime.pipeline import Pipeline, check_explicit_timesteps

    label, lines = load_prompt_lines(prompts)
    if timesteps is not None:  # before the judge and the model load
        check_explicit_timesteps(timesteps)
    judge = None
    if score is not None:
        from .judge import Judge
        check_corpus(score)
        judge = Judge.load()  # a missing judge fails before the grid is drawn
    out = output_paths(output, 1)[0]
    pipe = Pipeline.load(model)
    t0 = time.perf_counter()
    gen = pipe.run(lines, [seed] * len(lines), steps=steps, guidance=guidance, timesteps=timesteps,
                   complete_style=complete_style)
    seconds = time.perf_counter() - t0
    p = gen.params
    times = f" ({' '.join(f'{t:g}' for t in p.timesteps)})" if timesteps is not None else ""
    save_png(image_grid(gen.images, cols), out, f"{len(lines)} prompts from {label}\nSteps: {p.steps}{times}, "
             f"CFG scale: {p.guidance:g}, Seed: {seed}, Model hash: {pipe.hash}, Model: {pipe.name}")
    res = {"path": out, "n_prompts": len(lines), "seconds": seconds}
    if judge is not None:
        scores = score_grid(gen.images, lines, score, judge)
        scores.update({"model": pipe.name, "model_hash": pipe.hash, "steps": p.steps, "timesteps": p.timesteps,
                       "guidance": p.guidance, "seed": seed, "prompts_file": label,
                       "styles_completed": sum(a != b for a, b in zip(p.prompts, lines))})
        write_text_atomic(out.with_suffix(".json"), json.dumps(scores, indent=1))
        res.update(json=out.with_suffix(".json"), scores=scores)
    return res


def recognition_summary(scores: dict) -> str:
    """One line: top-1/top-5 of the generated images, the corpus images' in brackets."""
    g, r = scores["generated"], scores["real"]
    return (f"single-emoji recognition of {g['n']} prompts, generated (corpus images): caption top-1 among "
            f"{g['pool']} {g['top1']:.3f} ({r['top1']:.3f}), top-5 {g['top5']:.3f} ({r['top5']:.3f}); concept "
            f"top-1 among {g['groups']['n_groups']} {g['groups']['top1']:.3f} ({r['groups']['top1']:.3f}), "
            f"top-5 {g['groups']['top5']:.3f} ({r['groups']['top5']:.3f})")

