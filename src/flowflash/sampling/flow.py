"""Rectified-flow sampling, SD3 convention: x_t = (1 - t) x0 + t eps, v = eps - x0, t=1 is noise."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_t, t in [0,1] per sample) -> v


def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift: spends more steps at high noise when shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """num_steps + 1 times from 1 down to 0 (float64 for exact schedules)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def euler_step(x: Tensor, v: Tensor, t: float, t_next: float) -> Tensor:
    return x + (t_next - t) * v


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
    return v_uncond + guidance * (v_cond - v_uncond)


def sample(velocity: Velocity, noise: Tensor, ts: Tensor, callback: Callable[[int], None] | None = None) -> Tensor:
    """Integrate the flow ODE from ts[0] (noise) to ts[-1] with Euler steps."""
    x = noise
    for i in range(len(ts) - 1):
        t = torch.full((x.shape[0],), float(ts[i]), dtype=x.dtype)
        x = euler_step(x, velocity(x, t), float(ts[i]), float(ts[i + 1]))
        if callback:
            callback(i)
    return x
