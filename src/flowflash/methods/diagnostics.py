"""Diagnostics of the distribution-matching gradient: how noisy is it, with and without timestep sharing.

On one fixed batch (fixed captions, fixed starting noise, fixed student/critic/teacher weights), the
student's DM gradient is drawn `draws` times; what changes between draws is only what the method itself
samples: the student step i, and for re-noising also the matching time t and the fresh noise. The
spread of those draws around their mean is the variance the issue asks to compare.
"""
from __future__ import annotations

import copy

import torch

from ..train.data import Batch
from .dmd2 import DMD2
from .flash import Flash


def dm_gradient(method: DMD2, b: Batch) -> torch.Tensor:
    """One draw of the student's distribution-matching gradient, flattened (no optimizer step)."""
    loss, _ = method.dm_loss(b)
    params = [p for p in method.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gradient_variance(method: DMD2, b: Batch, draws: int = 16, seed: int = 0) -> dict:
    """Total variance (trace of the covariance) of `draws` gradient draws, and relative to the squared norm
    of their mean, so that methods with different gradient scales compare."""
    if draws < 2:
        raise ValueError(f"need at least 2 draws to measure a variance, got {draws}")
    method.gen.manual_seed(seed)
    g = torch.stack([dm_gradient(method, b) for _ in range(draws)]).double()
    mean = g.mean(0)
    total_var = g.var(0, unbiased=True).sum().item()
    mean_sq = mean.pow(2).sum().item()
    return {"draws": draws, "total_variance": total_var, "mean_grad_sq_norm": mean_sq,
            "relative_variance": total_var / max(mean_sq, 1e-30),
            "timestep_sharing": method.sharing}


def compare_sharing(method: Flash, b: Batch, draws: int = 16, seed: int = 0) -> dict:
    """The same roles and batch, matched with timestep sharing on and off."""
    out = {}
    for sharing in (True, False):
        m = copy.copy(method)  # shares the (unchanged) networks; only the switch differs
        m.sharing = sharing
        m.gen = torch.Generator()
        out["sharing" if sharing else "renoise"] = gradient_variance(m, b, draws, seed)
    return out
