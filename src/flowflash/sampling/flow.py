"""Rectified-flow math, SD3 convention: x_t = (1 - t) x0 + t eps, v = eps - x0, t = 1 is noise.

The only home of this algebra: training (teacher and every distillation method), the TG pool,
diagnostics and the Pipeline call these functions instead of writing the formulas again.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_t, t in [0,1] per sample) -> v


def _bc(t: Tensor | float, x: Tensor) -> Tensor | float:
    """A per-sample t, shaped to broadcast over x's non-batch dimensions (a float stays a float)."""
    return t.view(-1, *([1] * (x.dim() - 1))) if torch.is_tensor(t) else t


# ------------------------------------------------------------------ the forward process and conversions
def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """The point at time t on the straight path from x0 (t = 0) to noise (t = 1)."""
    tb = _bc(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The path's constant velocity: what a rectified-flow model regresses."""
    return noise - x0


def x0_from_v(x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    return x_t - _bc(t, x_t) * v


def noise_from_v(x_t: Tensor, t: Tensor | float, v: Tensor) -> Tensor:
    return x_t + (1 - _bc(t, x_t)) * v


def v_from_x0(x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """Velocity implied by an x0 prediction; divides by t, so callers clamp t away from 0."""
    return (x_t - x0) / _bc(t, x_t)


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance; guidance 1 is the conditional velocity."""
    return v_uncond + guidance * (v_cond - v_uncond)


def guided_velocity(both: Velocity, x: Tensor, t: Tensor, guidance: float) -> Tensor:
    """CFG in one batched call: `both` sees [x, x] and returns the conditional rows first, then the
    unconditional ones (its conditioning is stacked that way)."""
    v_cond, v_uncond = both(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
    return cfg_velocity(v_cond, v_uncond, guidance)


# ------------------------------------------------------------------ timesteps
def time_shift(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift: spends more steps at high noise when shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """SD3/Flux dynamic shifting: mu grows linearly with the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def exponential_shift(t: Tensor, mu: float, sigma: float = 1.0) -> Tensor:
    """The dynamic form of the shift (diffusers' 'exponential' time shift); equals time_shift at shift e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_from_scheduler_config(config: dict, image_seq_len: int | None = None) -> float:
    """The static shift a diffusers FlowMatchEulerDiscreteScheduler config asks for, at this many image tokens
    when it uses dynamic shifting (then it must be given). Both of diffusers' forms of the dynamic shift,
    exp(mu) / (exp(mu) + (1/t - 1)) and mu / (mu + (1/t - 1)), are `time_shift` at one static value."""
    if config.get("shift_terminal") or config.get("stochastic_sampling") or any(
            config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        raise ValueError("this scheduler config stretches or redraws its sigmas; only the shifted uniform "
                         "schedule is supported")
    if config.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise ValueError("this scheduler shifts by resolution: pass image_seq_len")
        mu = dynamic_shift_mu(image_seq_len, config.get("base_image_seq_len", 256),
                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                              config.get("max_shift", 1.15))
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {kind!r}")
        return math.exp(mu) if kind == "exponential" else mu
    return float(config.get("shift", 1.0))


def timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """num_steps + 1 times from 1 down to 0 (float64 for exact schedules)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def subdivide(t0: float, t1: float, n: int) -> Tensor:
    """n equal Euler steps from t0 to t1 (the teacher's fine steps inside one student interval)."""
    return torch.tensor([t0 + (t1 - t0) * j / n for j in range(n + 1)], dtype=torch.float64)


def logit_normal_t(n: int, mean: float, std: float, gen: torch.Generator) -> Tensor:
    """SD3's training-time density: sigmoid of a normal."""
    return torch.sigmoid(torch.randn(n, generator=gen) * std + mean)


# ------------------------------------------------------------------ the sampler
def euler_step(x: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """One step, computed in at least fp32 and returned in x's dtype (as diffusers' scheduler steps). The times
    are numbers, or one per sample."""
    dt = _bc(t_next - t, x)
    if torch.finfo(x.dtype).bits >= 32:
        return x + dt * v
    return (x.float() + dt * v).to(x.dtype)  # the sum in fp32, as diffusers (number times: the product in v's dtype)


def sample(velocity: Velocity, noise: Tensor, ts: Tensor, callback: Callable[[int], None] | None = None) -> Tensor:
    """Integrate the flow ODE from ts[0] to ts[-1] with Euler steps. The time handed to the model stays at
    least fp32 (a bf16 t * 1000 would round 818 to 820), as diffusers keeps its timesteps."""
    x = noise
    t_dtype = x.dtype if torch.finfo(x.dtype).bits >= 32 else torch.float32
    for i in range(len(ts) - 1):
        t = torch.full((x.shape[0],), float(ts[i]), dtype=t_dtype, device=x.device)
        x = euler_step(x, velocity(x, t), float(ts[i]), float(ts[i + 1]))
        if callback:
            callback(i)
    return x
