"""Diagnostics of the distribution-matching gradient: how noisy is it, with and without timestep sharing.

`gradient_variance`/`compare_sharing`: on one fixed batch (fixed captions, fixed starting noise, fixed
student/critic/teacher weights), the student's DM gradient is drawn `draws` times; what changes between draws
is only what the method itself samples: the student step i, and for re-noising also the matching time t and
the fresh noise (and, with `dm_norm: renoised`, the normaliser's noise). `gradient_noise`: issue 14's table,
each arm over independent minibatches against a reference gradient.
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


def noise_stats(total: torch.Tensor, sq: float, k: int) -> dict:
    """Unbiased signal and noise of k gradient draws from their sum and sum of squared norms: the noise is
    E||g - E g||^2 (k - 1 in the denominator), the signal ||E g||^2 = ||mean||^2 - noise / k (the mean's own
    noise removed; it can come out below 0 when the signal is below the noise floor of k draws)."""
    mean = total / k
    m2 = mean.pow(2).sum().item()
    noise = max((sq - k * m2) / (k - 1), 0.0)
    signal = m2 - noise / k
    return {"snr": signal / max(noise, 1e-30), "signal": signal, "noise": noise, "mean_norm": m2 ** 0.5}


def gradient_noise(method: Flash, draw, arms: list[str], k: int = 16, ref_draws: int = 256, batch: int = 16,
                   seed: int = 0) -> dict:
    """Each arm's DM gradient over the same k independent minibatches (captions and noise from `draw`; every
    arm sees the same stream), on the same roles: the unbiased SNR (noise_stats), the mean cosine of each draw
    to a reference gradient, and the cosine of the arm's mean to it. The reference is the mean of `ref_draws`
    draws of arm A (re-noising: the DM objective's gradient as DMD2 estimates it; calling another arm "biased"
    against it assumes that objective). The cosine of a mean is lowered by the noise left in both means as well
    as by bias: `ref_split_half_cos`, the cosine between the two halves of the reference's draws, shows how far
    noise alone brings it down. Streams sums: memory stays at a few gradients."""
    if k < 2 or ref_draws < 2:
        raise ValueError(f"need at least 2 minibatches per arm and 2 reference draws, got {k} and {ref_draws}")

    from tqdm import tqdm

    bar = tqdm(total=ref_draws + k * len(arms), desc="gradient draws", leave=False)

    def draws(name: str, n: int, stream: int, data_stream: int):
        m = arm(method, name)
        m.gen.manual_seed(seed * 1000 + stream)
        gen = torch.Generator().manual_seed(seed * 1000 + 500 + data_stream)
        for _ in range(n):
            yield dm_gradient(m, draw(batch, gen)).double()
            bar.update(1)

    halves = [None, None]
    for i, g in enumerate(draws("A_renoise", ref_draws, 0, 0)):
        h = i % 2
        halves[h] = g.clone() if halves[h] is None else halves[h].add_(g)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    ref = (halves[0] + halves[1]) / ref_draws
    out = {"reference": {"arm": "A_renoise", "draws": ref_draws, "norm": ref.norm().item(),
                         "ref_split_half_cos": cos(halves[0], halves[1])}, "arms": {}}
    for j, name in enumerate(arms, 1):
        total, sq, cosines = None, 0.0, []
        for g in draws(name, k, j, 1):  # data stream 1 for every arm: the same minibatches
            total = g.clone() if total is None else total.add_(g)
            sq += g.pow(2).sum().item()
            cosines.append(cos(g, ref))
        out["arms"][name] = {"minibatches": k, **noise_stats(total, sq, k), "cos_draw_to_ref": sum(cosines) / k,
                             "cos_draw_to_ref_sd": float(torch.tensor(cosines).std()),
                             "cos_mean_to_ref": cos(total / k, ref)}
    bar.close()
    return out
