"""Student timestep schedules: the n + 1 times a few-step student visits, from 1 (noise) to 0."""
from __future__ import annotations

import torch

from ..errors import FlowflashError
from ..sampling import timesteps


def student_schedule(steps: int, shift: float, explicit: list[float] | None = None) -> list[float]:
    if explicit is not None:
        s = [float(t) for t in explicit]
        if len(s) < 2 or s[-1] != 0.0:
            raise FlowflashError(f"a student schedule lists its times from noise to 0 and ends at 0, got {s}")
        if any(not (0.0 < t <= 1.0) for t in s[:-1]):
            raise FlowflashError(f"student schedule steps must lie in (0, 1], got {s[:-1]}")
        if any(a <= b for a, b in zip(s, s[1:])):
            raise FlowflashError(f"student schedule must decrease strictly, got {s}")
        return s
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
