"""Student timestep schedules: the n + 1 times a few-step student visits, from 1 (noise) to 0."""
from __future__ import annotations

import torch

from ..errors import FlowflashError
from ..models.protocol import check_schedule
from ..sampling import timesteps


def student_schedule(steps: int, shift: float, explicit: list[float] | None = None) -> list[float]:
    if explicit is not None:  # checked as the exported model's schedule will be
        return list(check_schedule(explicit))
    if steps < 1:
        raise FlowflashError(f"student steps must be >= 1, got {steps}")
    return [float(t) for t in timesteps(steps, shift)]


def split_range(name: str | None, at: float = 0.5) -> tuple[float, float]:
    """Which student timesteps a split-timestep branch trains on: t in (lo, hi]."""
    if not 0.0 < at < 1.0:
        raise FlowflashError(f"split_at must lie in (0, 1), got {at}")
    ranges = {None: (0.0, 1.0), "low": (0.0, at), "high": (at, 1.0)}
    if name not in ranges:
        raise FlowflashError(f"split must be low, high or empty, got {name!r}")
    return ranges[name]


def steps_in_range(schedule: list[float], lo: float, hi: float) -> list[int]:
    """Indices i of student steps whose start time t_i lies in (lo, hi]."""
    idx = [i for i, t in enumerate(schedule[:-1]) if lo < t <= hi]
    if not idx:
        raise FlowflashError(f"no student step of {schedule} has t in ({lo}, {hi}]")
    return idx


def as_tensor(schedule: list[float]) -> torch.Tensor:
    return torch.tensor(schedule, dtype=torch.float64)
