"""The Python API: `Pipeline.load(name_or_path).generate(prompt, ...) -> list[PIL.Image]`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..data.dataset import to_uint8
from ..errors import FlowflashError
from ..models.flow_model import FlowModel, load_model, make_conditioner, state_dict_hash
from ..sampling import cfg_velocity, sample, timesteps

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
    known = sorted(set(ALIASES) | {p.name for p in WEIGHTS.glob("*") if p.is_dir()})
    raise FlowflashError(f"unknown model {name!r}: not a folder, and not a shipped model ({', '.join(known)})")


@dataclass
class Timings:
    text_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.text_s + self.denoise_s + self.decode_s


def validate_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise FlowflashError("prompt is empty")
    return prompt.strip()


@dataclass
class Pipeline:
    model: FlowModel
    path: Path
    use_minilm: bool = True
    timings: Timings = field(default_factory=Timings)

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, use_minilm: bool = True,
             precision: str = "fp32") -> "Pipeline":
        """precision: the transformer's compute dtype, fp32 or bf16 (the text encoders stay fp32)."""
        if precision not in PRECISIONS:
            raise FlowflashError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        path = resolve_model(name_or_path)
        model = load_model(path, PRECISIONS[precision])
        pipe = cls(model, path, use_minilm)
        pipe.cond = make_conditioner(model, with_minilm=use_minilm)
        return pipe

    @property
    def name(self) -> str:
        return self.model.cfg.name

    @property
    def hash(self) -> str:
        if not hasattr(self, "_hash"):
            self._hash = state_dict_hash(self.path)
        return self._hash

    def schedule(self, steps: int | None) -> torch.Tensor:
        cfg = self.model.cfg
        if steps is None and cfg.schedule:
            return torch.tensor(cfg.schedule, dtype=torch.float64)
        return timesteps(steps or cfg.default_steps, cfg.shift)

    def generate(self, prompt: str | list[str], steps: int | None = None, guidance: float | None = None,
                 seed: int = 0, num_images: int = 1, size: int | None = None, progress=None) -> list[Image.Image]:
        """num_images per prompt; image k of each prompt uses seed + k, independent of batching."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not isinstance(num_images, int) or num_images < 1:
            raise FlowflashError(f"num_images must be a positive integer, got {num_images!r}")
        if size is not None and size != self.model.cfg.image_size:
            raise FlowflashError(f"this model makes {self.model.cfg.image_size}px images only, not {size}px")
        return self.generate_seeded([p for p in prompts for _ in range(num_images)],
                                    [seed + k for _ in prompts for k in range(num_images)], steps, guidance, progress)

    @torch.no_grad()
    def generate_seeded(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                        guidance: float | None = None, progress=None) -> list[Image.Image]:
        """One image per (prompt, seed) pair; the noise of an image depends on its seed only."""
        cfg = self.model.cfg
        prompts = [validate_prompt(p) for p in prompts]
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise FlowflashError(f"steps must be a positive integer, got {steps!r}")
        guidance = cfg.default_guidance if guidance is None else float(guidance)
        if not guidance >= 0:
            raise FlowflashError(f"guidance must be >= 0, got {guidance}")
        b = len(prompts)
        t0 = time.perf_counter()
        ids = self.cond.light_ids(prompts)
        mh, mp = self.cond.encode_minilm(prompts)
        on = torch.ones(b, dtype=torch.bool)
        dtype = next(self.model.transformer.parameters()).dtype
        ctx, pooled = self.cond.combine(ids, mh, mp, on, on & self.use_minilm)
        use_cfg = guidance != 1.0
        if use_cfg:
            off = torch.zeros(b, dtype=torch.bool)
            uctx, upooled = self.cond.combine(ids, mh, mp, off, off)
            ctx, pooled = torch.cat([ctx, uctx]), torch.cat([pooled, upooled])
        ctx, pooled = ctx.to(dtype), pooled.to(dtype)
        t1 = time.perf_counter()

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not use_cfg:
                return self.model(x, t, ctx, pooled)
            vc, vu = self.model(torch.cat([x, x]), torch.cat([t, t]), ctx, pooled).chunk(2)
            return cfg_velocity(vc, vu, guidance)

        c, s = cfg.channels, cfg.image_size
        noise = torch.stack([torch.randn(c, s, s, generator=torch.Generator().manual_seed(sd)) for sd in seeds]).to(dtype)
        ts = self.schedule(steps)
        x = sample(velocity, noise, ts, callback=progress)
        t2 = time.perf_counter()
        arr = to_uint8(x.float()).permute(0, 2, 3, 1).numpy()
        images = [Image.fromarray(a) for a in arr]
        self.timings = Timings(t1 - t0, t2 - t1, time.perf_counter() - t2)
        self.last_params = dict(steps=len(ts) - 1, guidance=guidance, seeds=list(seeds), size=s)
        return images
