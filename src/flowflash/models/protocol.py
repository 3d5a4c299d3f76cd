"""What the Pipeline needs of a text-to-image flow model, so pixel-space and latent (VAE) models share it.

A model has named text encoders, each droppable; it turns prompts into conditioning, predicts a velocity,
and maps between images and its own space (identity for pixel space, a VAE for latent models). How it
samples by default is recorded apart from the architecture, in `SamplingDefaults`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import FlowflashError
from ..sampling import timesteps as shifted_timesteps
from .text import words as _words


def check_schedule(times) -> tuple[float, ...]:
    """Sampling times as floats (any sequence of numbers: a list, a tuple, an array, a 1-D tensor): from a time in
    (0, 1] down to exactly 0, strictly decreasing and finite; else one clear error."""
    try:
        s = [] if isinstance(times, (str, bytes)) or any(isinstance(t, (bool, str)) for t in times) else \
            [float(t) for t in times]
    except (TypeError, ValueError):
        s = []
    if (len(s) < 2 or not all(math.isfinite(t) for t in s) or s[-1] != 0 or not 0 < s[0] <= 1
            or any(a <= b for a, b in zip(s, s[1:]))):
        raise FlowflashError(f"a sampling schedule runs from a time in (0, 1] down to 0, strictly decreasing (it "
                             f"ends at 0); got {s or times!r}")
    return tuple(s)


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 50
    guidance: float = 4.0  # CFG scale; 1 turns CFG off
    shift: float = 1.5  # SD3's time shift (also the training-time shift of a teacher)
    schedule: tuple[float, ...] | None = None  # a distilled student's fixed times, 1 -> 0
    # other step counts the same weights were trained at (also_steps), each with its own times: `--steps K` runs them
    other_schedules: tuple[tuple[float, ...], ...] = ()
    # Style completion: a prompt that names none of `styles` (nor the word "style") gets ", DEFAULT_STYLE" appended.
    # The emoji corpus captions every single "NAME, STYLE", and the emoji student draws held-out plain prompts better
    # with its best style named (docs/benchmarks.md, the ninth to eleventh looks: on for both shipped models).
    # None: prompts are drawn as typed.
    default_style: str | None = None
    styles: tuple[str, ...] = ()

    def __post_init__(self):
        """Checked here, so a bad config.json is one clear error, not a failure at the first call."""
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            raise FlowflashError(f"sampling steps must be a positive integer, got {self.steps!r}")
        if not (num(self.guidance) and self.guidance >= 0):
            raise FlowflashError(f"sampling guidance must be a number >= 0, got {self.guidance!r}")
        if not (num(self.shift) and self.shift > 0):
            raise FlowflashError(f"sampling shift must be a number > 0, got {self.shift!r}")
        if self.schedule is not None:
            object.__setattr__(self, "schedule", check_schedule(self.schedule))
            if len(self.schedule) - 1 != self.steps:  # `steps` is what a caller without --steps gets: one answer
                raise FlowflashError(f"sampling steps ({self.steps}) differ from the schedule's count "
                                     f"({len(self.schedule) - 1} steps: {list(self.schedule)})")
        object.__setattr__(self, "other_schedules", tuple(check_schedule(o) for o in (self.other_schedules or ())))
        counts = self.trained_steps
        if len(set(counts)) != len(counts):
            raise FlowflashError(f"sampling schedules give one step count twice: {list(counts)}")
        styles = self.styles or ()
        if isinstance(styles, str) or not all(isinstance(x, str) and _words(x) for x in styles):
            raise FlowflashError(f"sampling styles must be a list of style names, got {self.styles!r}")
        object.__setattr__(self, "styles", tuple(styles))
        if self.default_style is not None and self.default_style not in self.styles:
            raise FlowflashError(f"sampling default_style {self.default_style!r} is not one of its styles "
                                 f"{list(self.styles)}")

    def complete(self, prompt: str) -> str:
        """The prompt with the default style appended when it names no style (a style's first word, e.g.
        "twemoji" or "fluent", or the word "style"); unchanged for a model without one. Pipeline.complete draws
        it, unless the suffix would make the text encoders cut a prompt that fits as typed."""
        if self.default_style is None:
            return prompt
        named = {"style"} | {_words(s)[0] for s in self.styles}
        if named & set(_words(prompt)):
            return prompt
        head = re.sub(r"[\s.,;:!?\u2026]+$", "", prompt)  # "a dog face." -> "a dog face, STYLE"
        return f"{head}, {self.default_style}" if head else self.default_style

    @property
    def trained_steps(self) -> tuple[int, ...]:
        """The step counts with times of their own (a distilled student's: its default first, then also_steps);
        empty for a model that samples any count on the shifted grid."""
        return tuple(len(s) - 1 for s in ((self.schedule,) if self.schedule else ()) + self.other_schedules)

    def timesteps(self, steps: int | None = None) -> Tensor:
        """The times to sample at: the fixed schedule when no step count or its own count is asked, a trained
        other schedule of that count, else shifted uniform (so `--steps 4` on a 4-step student is its default)."""
        if self.schedule and (steps is None or steps == len(self.schedule) - 1):
            return torch.tensor(self.schedule, dtype=torch.float64)
        for other in self.other_schedules:
            if steps == len(other) - 1:
                return torch.tensor(other, dtype=torch.float64)
        return shifted_timesteps(steps or self.steps, self.shift)

    def to_dict(self) -> dict:
        d = {"steps": self.steps, "guidance": self.guidance, "shift": self.shift,
             "schedule": list(self.schedule) if self.schedule else None}
        if self.other_schedules:  # written only when present: older folders' config.json stay as they were
            d["other_schedules"] = [list(o) for o in self.other_schedules]
        if self.styles:
            d["styles"] = list(self.styles)
        if self.default_style is not None:
            d["default_style"] = self.default_style
        return d


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

    @property
    def denoiser(self) -> torch.nn.Module: ...

    def compile(self) -> None: ...  # torch.compile what pays off on this device (--compile): the denoiser at least

    def to(self, device: torch.device | str) -> "TextToImageModel": ...

    def check_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]: ...  # (width, height); None: default

    def timesteps(self, steps: int | None, size: tuple[int, int] | None = None) -> Tensor: ...  # N + 1 times, 1 -> 0

    def condition(self, prompts: list[str], drop: frozenset[str], cfg: bool,
                  negative: list[str] | None = None) -> Conditioning: ...

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
