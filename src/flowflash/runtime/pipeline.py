"""The Python API: `Pipeline.load(name_or_path).generate(prompt, ...) -> list[PIL.Image]`.

The Pipeline is model-agnostic: it asks the model for the noise of each seed, picks the timesteps,
applies CFG and runs the sampler over any `TextToImageModel` (models/protocol.py). What a call used and how long it took come
back explicitly as a `Generation` (`Pipeline.run`), and the last one stays readable as `pipe.last`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import FlowflashError
from ..images import u8_to_pil
from ..models.protocol import SamplingDefaults, TextToImageModel, check_drop
from ..models.storage import weights_hash
from ..sampling import guided_velocity, sample

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ALIASES = {"teacher": "emoji-teacher", "student": "emoji-student"}
DEFAULT_MODEL = "student"  # the 4-step CFG-free distilled student; the teacher stays `--model teacher`
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A shipped model's name (or alias), or a folder path."""
    name = str(name_or_path or DEFAULT_MODEL)
    shipped = WEIGHTS / ALIASES.get(name, name)
    if "/" not in name and shipped.is_dir():
        return shipped
    path = Path(name)
    if path.is_dir():
        return path
    known = sorted(set(ALIASES) | {p.name for p in WEIGHTS.glob("*") if p.is_dir() and p.name != "judge"})
    raise FlowflashError(f"unknown model {name!r}: not a folder, and not a shipped model ({', '.join(known)})")


def validate_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise FlowflashError("prompt is empty")
    return prompt.strip()


@dataclass
class Timings:
    text_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.text_s + self.denoise_s + self.decode_s


@dataclass
class GenerationParams:
    steps: int
    guidance: float
    seeds: list[int]
    size: tuple[int, int]  # (width, height)
    timesteps: list[float]
    dropped: tuple[str, ...] = ()


@dataclass
class Generation:
    """One call's images, the parameters they were made with, its timings and its warnings."""
    images: list[Image.Image]
    params: GenerationParams
    timings: Timings
    warnings: list[str] = field(default_factory=list)


class Pipeline:
    """Text-to-image over one loaded model. `pipe.last` is the Generation of the most recent call."""

    def __init__(self, model: TextToImageModel, path: Path | None = None, drop=(), name: str | None = None):
        self.model = model
        self.path = path  # the model folder; None for a model that lives in memory only
        self.name = name or model.name
        self.drop = check_drop(drop, model.encoder_names)
        self.last: Generation | None = None
        self._hash: str | None = None if path is not None else "in-memory"

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, *, drop=(), precision: str = "fp32") -> "Pipeline":
        """A shipped model's name or a model folder. drop: text encoders to leave out (e.g. ("minilm",));
        precision: the transformer's compute dtype, fp32 or bf16 (text encoders stay fp32)."""
        from ..models.emoji import EmojiModel

        if precision not in PRECISIONS:
            raise FlowflashError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        check_drop(drop, EmojiModel.encoder_names)  # a wrong name fails before any loading
        path = resolve_model(name_or_path)
        return cls(EmojiModel.load(path, PRECISIONS[precision], drop), path, drop)

    @classmethod
    def from_flow_model(cls, net, name: str, *, minilm=None, drop=()) -> "Pipeline":
        """An in-memory emoji FlowModel (e.g. a merge under evaluation), reusing a loaded MiniLM if given."""
        from ..models.emoji import EmojiModel
        from ..models.text import MiniLMEncoder

        drop = check_drop(drop, EmojiModel.encoder_names)
        if minilm is None and "minilm" not in drop:
            minilm = MiniLMEncoder(max_tokens=net.cfg.minilm_max_tokens)
        return cls(EmojiModel(net, minilm), None, drop, name)

    @property
    def hash(self) -> str:
        """Short sha256 of the weight files (in PNG metadata and evaluation caches)."""
        if self._hash is None:
            self._hash = weights_hash(self.path)
        return self._hash

    @property
    def sampling(self) -> SamplingDefaults:
        return self.model.sampling

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        return self.sampling.timesteps(steps)

    def generate(self, prompt: str | list[str], steps: int | None = None, guidance: float | None = None,
                 seed: int = 0, num_images: int = 1, size: int | tuple[int, int] | None = None,
                 progress=None) -> list[Image.Image]:
        """num_images per prompt; image k of each prompt uses seed + k, independent of batching."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise FlowflashError(f"num_images must be a positive integer, got {num_images!r}")
        seeds = [seed + k for _ in prompts for k in range(num_images)]
        return self.run([p for p in prompts for _ in range(num_images)], seeds, steps, guidance, size,
                        progress).images

    @torch.no_grad()
    def run(self, prompts: list[str], seeds: list[int], steps: int | None = None, guidance: float | None = None,
            size: int | tuple[int, int] | None = None, progress=None) -> Generation:
        """One image per (prompt, seed) pair; the noise of an image depends on its seed only."""
        prompts = [validate_prompt(p) for p in prompts]
        if len(prompts) != len(seeds):
            raise FlowflashError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise FlowflashError(f"steps must be a positive integer, got {steps!r}")
        guidance = self.sampling.guidance if guidance is None else float(guidance)
        if not guidance >= 0:
            raise FlowflashError(f"guidance must be >= 0, got {guidance}")
        wh = self.model.check_size(size)
        use_cfg = guidance != 1.0
        t0 = time.perf_counter()
        cond = self.model.condition(prompts, self.drop, use_cfg)
        t1 = time.perf_counter()

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = lambda x_, t_: self.model.velocity(x_, t_, cond)
            return guided_velocity(v, x, t, guidance) if use_cfg else v(x, t)

        ts = self.timesteps(steps)
        x = sample(velocity, self.model.noise(seeds, wh), ts, callback=progress)
        t2 = time.perf_counter()
        images = u8_to_pil(self.model.decode(x))
        for note in dict.fromkeys(cond.warnings):
            warnings.warn(note, stacklevel=3)
        params = GenerationParams(len(ts) - 1, guidance, list(seeds), wh, [float(t) for t in ts],
                                  tuple(sorted(self.drop)))
        self.last = Generation(images, params, Timings(t1 - t0, t2 - t1, time.perf_counter() - t2),
                               list(dict.fromkeys(cond.warnings)))
        return self.last
