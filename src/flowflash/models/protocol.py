"""What the Pipeline needs of a text-to-image flow model, so pixel-space and latent (VAE) models share it.

A model has named text encoders, each droppable; it turns prompts into conditioning, predicts a velocity,
and maps between images and its own space (identity for pixel space, a VAE for latent models). How it
samples by default is recorded apart from the architecture, in `SamplingDefaults`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import FlowflashError
from ..sampling import timesteps as shifted_timesteps


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 50
    guidance: float = 4.0  # CFG scale; 1 turns CFG off
    shift: float = 1.5  # SD3's time shift (also the training-time shift of a teacher)
    schedule: tuple[float, ...] | None = None  # a distilled student's fixed times, 1 -> 0

    def __post_init__(self):
        if self.schedule is not None:
            object.__setattr__(self, "schedule", tuple(float(t) for t in self.schedule))

    def timesteps(self, steps: int | None = None) -> Tensor:
        """The times to sample at: the fixed schedule when no step count is asked, else shifted uniform."""
        if steps is None and self.schedule:
            return torch.tensor(self.schedule, dtype=torch.float64)
        return shifted_timesteps(steps or self.steps, self.shift)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "shift": self.shift,
                "schedule": list(self.schedule) if self.schedule else None}


@dataclass
class Conditioning:
    """The transformer's text inputs for a batch (SD3: encoder_hidden_states, pooled_projections). With CFG the
    batch holds the conditional rows first, then the unconditional ones."""
    context: Tensor
    pooled: Tensor
    warnings: list[str] = field(default_factory=list)  # e.g. truncated prompts, one message per encoder


@runtime_checkable
class TextToImageModel(Protocol):
    name: str
    sampling: SamplingDefaults
    encoder_names: tuple[str, ...]  # every encoder is individually droppable

    @property
    def dtype(self) -> torch.dtype: ...

    def check_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]: ...

    def condition(self, prompts: list[str], drop: frozenset[str], cfg: bool) -> Conditioning: ...

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...

    def noise(self, seeds: list[int], size: tuple[int, int]) -> Tensor: ...

    def decode(self, x: Tensor) -> Tensor: ...  # model space -> uint8 images (N, 3, H, W)

    def encode(self, images_u8: Tensor) -> Tensor: ...  # uint8 images -> model space (img2img, training)


def check_drop(drop, known: tuple[str, ...]) -> frozenset[str]:
    drop = frozenset(drop or ())
    unknown = sorted(drop - set(known))
    if unknown:
        raise FlowflashError(f"cannot drop {', '.join(unknown)}: this model's text encoders are {', '.join(known)}")
    return drop
