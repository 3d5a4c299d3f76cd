"""In-domain image-text scorer (a CLIP-score analogue), trained only on the training split.

Image side: frozen EfficientNet-Lite0 features -> linear projection. Text side: frozen MiniLM
sentence vector -> linear projection. Trained with the symmetric InfoNCE loss of CLIP. Both towers
are frozen pretrained networks that nobody here trained; only the two projections are learned.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Scorer(nn.Module):
    def __init__(self, img_dim: int = 1280, txt_dim: int = 384, dim: int = 256):
        super().__init__()
        self.img = nn.Sequential(nn.LayerNorm(img_dim), nn.Linear(img_dim, dim))
        self.txt = nn.Sequential(nn.LayerNorm(txt_dim), nn.Linear(txt_dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), CLIP's start

    def embed_images(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img(feats.float()), dim=-1)

    def embed_texts(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.txt(feats.float()), dim=-1)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; rows that share a caption are not treated as negatives of each other."""
    logits = scale.exp().clamp(max=100) * img @ txt.T
    same = caption_ids[:, None] == caption_ids[None, :]
    logits_masked = logits.masked_fill(same & ~torch.eye(len(img), dtype=torch.bool), float("-inf"))
    target = torch.arange(len(img))
    return (F.cross_entropy(logits_masked, target) + F.cross_entropy(logits_masked.T, target)) / 2


def train_scorer(img_feats: torch.Tensor, txt_feats: torch.Tensor, caption_ids: torch.Tensor, steps: int = 1500,
                 batch: int = 256, lr: float = 2e-3, seed: int = 0) -> Scorer:
    torch.manual_seed(seed)
    model = Scorer(img_feats.shape[1], txt_feats.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(img_feats), generator=g)[:batch]
        loss = clip_loss(model.embed_images(img_feats[idx]), model.embed_texts(txt_feats[idx]), model.logit_scale,
                         caption_ids[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)
