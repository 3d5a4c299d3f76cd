"""Writing images: A1111-style "parameters" text chunk, atomic writes, output path checks."""
from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import FlowflashError
from ..fsutil import atomic_file


def parameters_text(prompt: str, steps: int, guidance: float, seed: int, size: tuple[int, int], model: str,
                    model_hash: str, negative: str | None = None, strength: float | None = None,
                    timesteps: list[float] | None = None) -> str:
    """A1111's layout: prompt, optional 'Negative prompt:' line, then the settings line (timesteps: when given in
    place of the model's schedule, so that the image can be made again)."""
    neg = f"\nNegative prompt: {negative}" if negative else ""
    extra = f", Denoising strength: {strength:g}" if strength is not None else ""
    extra += f", Timesteps: {' '.join(f'{t:g}' for t in timesteps)}" if timesteps is not None else ""
    return (f"{prompt}{neg}\nSteps: {steps}, Sampler: Euler (rectified flow), CFG scale: {guidance:g}, Seed: {seed}, "
            f"Size: {size[0]}x{size[1]}, Model hash: {model_hash}, Model: {model}{extra}")


def output_paths(out: str | None, n: int, default_stem: str = "flowflash") -> list[Path]:
    """Where n images go: a directory (existing, or given with a trailing /) or a file stem."""
    if out is None:
        out = "outputs/"
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        if not p.exists() and not p.parent.exists():
            raise FlowflashError(f"output directory's parent does not exist: {p.parent}")
        folder = p
        # after the highest number already there: a gap in the numbering must not lead to overwriting
        taken = [int(m.group(1)) for f in (folder.glob(f"{default_stem}-*.png") if folder.is_dir() else [])
                 if (m := re.fullmatch(rf"{re.escape(default_stem)}-(\d+)\.png", f.name))]
        start = max(taken) + 1 if taken else 0
        paths = [folder / f"{default_stem}-{start + i:04d}.png" for i in range(n)]
    else:
        if p.suffix.lower() != ".png":
            raise FlowflashError(f"output file must end in .png: {out}")
        if not p.parent.exists():
            raise FlowflashError(f"output directory does not exist: {p.parent}")
        paths = [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]
    target = paths[0].parent
    check = target if target.exists() else target.parent
    if not os.access(check, os.W_OK):
        raise FlowflashError(f"output directory is not writable: {check}")
    return paths


def save_png(image: Image.Image, path: Path, parameters: str):
    """Write via a temp file in the same folder and rename, so no partial PNG is ever left."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
