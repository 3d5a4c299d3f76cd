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


# ------------------------------------------------------------------ gradient noise across minibatches (issue 14)
ARMS = {  # the protocol's arms on one set of roles: (timestep sharing, match_point, dm_norm)
    "A_renoise": (False, "start", "renoised"),
    "B_sharing_start": (True, "start", "renoised"),
    "C_sharing_interval": (True, "interval", "renoised"),
    "B_old_normaliser": (True, "start", "matching"),
}


def arm(method: Flash, name: str) -> Flash:
    """The same roles (shared, unchanged networks) matched the way arm `name` matches."""
    import dataclasses

    sharing, point, norm = ARMS[name]
    m = copy.copy(method)
    m.sharing = sharing
    m.cfg = dataclasses.replace(method.cfg, match_point=point, dm_norm=norm)
    m.gen = torch.Generator()
    return m


def gradient_noise(method: Flash, draw, arms: list[str], k: int = 16, ref_draws: int = 128, batch: int = 16,
                   seed: int = 0) -> dict:
    """Each arm's DM gradient over k independent minibatches (fresh captions and noise from `draw`), on the same
    roles: SNR = ||mean g||^2 / mean ||g - mean g||^2, the mean cosine of each draw to a reference gradient, and
    the cosine of the arms' mean to it. The reference is the mean of `ref_draws` draws of arm A (re-noising, an
    unbiased estimate of the DM objective's gradient), so cos(mean, ref) shows an arm's bias and the per-draw
    cosine its bias and variance together. Streams sums: memory stays at a few gradients."""
    if k < 2:
        raise ValueError(f"need at least 2 minibatches per arm, got {k}")

    def draws(name: str, n: int, stream: int):
        m = arm(method, name)
        m.gen.manual_seed(seed * 1000 + stream)
        gen = torch.Generator().manual_seed(seed * 1000 + 500 + stream)
        for _ in range(n):
            yield dm_gradient(m, draw(batch, gen)).double()

    ref = None
    for g in draws("A_renoise", ref_draws, 0):
        ref = g.clone() if ref is None else ref.add_(g)
    ref /= ref_draws
    out = {"reference": {"arm": "A_renoise", "draws": ref_draws, "norm": ref.norm().item()}, "arms": {}}
    for j, name in enumerate(arms, 1):
        total, sq, cos = None, 0.0, []
        for g in draws(name, k, j):
            total = g.clone() if total is None else total.add_(g)
            sq += g.pow(2).sum().item()
            cos.append(torch.nn.functional.cosine_similarity(g, ref, dim=0).item())
        mean = total / k
        spread = sq / k - mean.pow(2).sum().item()  # mean ||g - mean||^2
        out["arms"][name] = {"minibatches": k, "snr": mean.pow(2).sum().item() / max(spread, 1e-30),
                             "mean_norm": mean.norm().item(), "cos_draw_to_ref": sum(cos) / k,
                             "cos_draw_to_ref_sd": float(torch.tensor(cos).std()),
                             "cos_mean_to_ref": torch.nn.functional.cosine_similarity(mean, ref, dim=0).item()}
    return out
