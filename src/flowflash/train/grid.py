"""Sample grids for eyeballing training progress."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def sample_grid(model_dir: Path, prompts: list[str], path: Path, steps: int | None = 28, guidance: float | None = 4.0,
                seed: int = 0):
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.load(model_dir)
    images = pipe.generate(prompts, steps=steps, guidance=guidance, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=min(8, len(images))).save(path)
