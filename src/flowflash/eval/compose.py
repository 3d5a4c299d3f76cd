"""GenEval-style compositional checks on scene images: background colour, object count, and
which object sits in which half (left/right, top/bottom) via a crop classifier."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from ..data.constants import COLORS

_NAMES = list(COLORS)
_RGB = np.array([COLORS[c] for c in _NAMES], dtype=np.float64)


def border_color(img: np.ndarray) -> np.ndarray:
    """Median colour of the outer 2-pixel ring of an (H, W, 3) uint8 image."""
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                           img[:, -2:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def background_name(img: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - border_color(img)) ** 2).sum(1)))]


def count_objects(img: np.ndarray, thresh: float = 60.0, min_area_frac: float = 0.01) -> int:
    """Connected blobs that differ from the background colour (closed first, so one emoji with
    detached parts, e.g. cherries, still counts once)."""
    fg = np.sqrt(((img.astype(np.float64) - border_color(img)) ** 2).sum(-1)) > thresh
    fg = ndimage.binary_closing(fg, iterations=2)
    labels, n = ndimage.label(fg)
    if n == 0:
        return 0
    areas = ndimage.sum(fg, labels, range(1, n + 1))
    return int((areas >= min_area_frac * img.shape[0] * img.shape[1]).sum())


def halves(img: np.ndarray, axis: str) -> list[np.ndarray]:
    """Two square crops (left/right or top/bottom halves), padded with the background colour."""
    h, w, _ = img.shape
    bg = border_color(img).astype(np.uint8)
    out = []
    parts = [img[:, : w // 2], img[:, w // 2:]] if axis == "lr" else [img[: h // 2], img[h // 2:]]
    for p in parts:
        sq = np.empty((h, w, 3), np.uint8)
        sq[:] = bg
        ph, pw = p.shape[:2]
        y, x = (h - ph) // 2, (w - pw) // 2
        sq[y: y + ph, x: x + pw] = p
        out.append(sq)
    return out


class CropClassifier(nn.Module):
    """Linear probe on EfficientNet-Lite0 features over the scene-object vocabulary."""

    def __init__(self, classes: list[str], dim: int = 1280):
        super().__init__()
        self.classes = classes
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(classes)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.float())


def train_classifier(feats: torch.Tensor, labels: torch.Tensor, classes: list[str], steps: int = 800,
                     seed: int = 0) -> CropClassifier:
    torch.manual_seed(seed)
    m = CropClassifier(classes, feats.shape[1])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(m(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval().requires_grad_(False)
