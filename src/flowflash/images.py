"""Image conversions in one place: PIL <-> uint8 tensors (N, 3, H, W) <-> model range [-1, 1], grids."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image


def to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return img.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pil_to_u8(images: Iterable[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> a contiguous uint8 tensor (N, 3, H, W)."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def u8_to_pil(u8: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in u8.permute(0, 2, 3, 1).numpy()]


def read_images(paths: Iterable[Path]) -> torch.Tensor:
    """Image files -> uint8 (N, 3, H, W); the files must share one size."""
    return pil_to_u8(Image.open(p) for p in paths)


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
