"""Image sets in prompt order: the corpus's own images of a prompt set, and folders of 00000.png, ..."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..errors import FlowflashError
from ..images import read_images, u8_to_pil
from .prompt_set import PromptSet


def real_images(data: Path, ps: PromptSet) -> torch.Tensor:
    """The corpus images of the prompt set's rows, uint8 (N, 3, H, W)."""
    missing = [r.get("file", "?") for r in ps.rows if not (Path(data) / r.get("file", "")).is_file()]
    if missing:
        raise FlowflashError(f"{len(missing)} real images of the prompt set are missing under {data} "
                             f"(e.g. {missing[0]}); build the corpus with: flowflash data build --out {data}")
    return read_images(Path(data) / r["file"] for r in ps.rows)


def read_image_folder(folder: Path, n: int) -> torch.Tensor:
    """Images named 00000.png, 00001.png, ... in prompt-set order, uint8 (n, 3, H, W)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlowflashError(f"image folder not found: {folder}")
    files = [folder / f"{i:05d}.png" for i in range(n)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FlowflashError(f"{folder} lacks {len(missing)} of the {n} images (e.g. {missing[0]})")
    sizes = set()
    for f in files:  # headers only: a clear error before any pixels are decoded
        with Image.open(f) as im:
            sizes.add(im.size)
    if len(sizes) > 1:
        raise FlowflashError(f"images in {folder} have mismatched sizes: {sorted(sizes)}")
    return read_images(files)


def save_image_folder(images: torch.Tensor, folder: Path):
    """uint8 (N, 3, H, W) -> folder/00000.png, ... (the layout read_image_folder reads back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(u8_to_pil(images)):
        im.save(folder / f"{i:05d}.png")
