"""Generating the image set of a setting: one image per prompt, prompt i with seed + i, optionally cached."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..fsutil import atomic_file
from ..images import pil_to_u8
from .prompt_set import PromptSet

PHASES = ("text_s", "denoise_s", "decode_s")


@dataclass(frozen=True)
class Setting:
    """One configuration to evaluate or benchmark."""
    name: str
    model: str = "teacher"
    steps: int | None = None  # None: the model's own
    guidance: float | None = None
    drop: tuple[str, ...] = ()  # text encoders to leave out, e.g. ("minilm",)
    precision: str = "fp32"
    backend: str = "torch"  # or openvino, openvino-int8, openvino-int4 (its weight compression)
    low_memory: bool = False  # quantized weights kept int8 in memory (same images)
    threads: int | None = None  # torch CPU threads while this setting runs (None: as the process has them)
    complete_style: bool = True  # a prompt naming no style gets the model's default style (Pipeline.complete)

    def __post_init__(self):
        object.__setattr__(self, "drop", tuple(sorted(set(self.drop))))  # one spelling per encoder set

    @property
    def minilm(self) -> bool:
        """Whether MiniLM is used: the column result rows have always reported."""
        return "minilm" not in self.drop

    def load(self):
        from ..runtime.pipeline import Pipeline
        backend, _, ov = self.backend.partition("-")
        kw = {"backend": backend, "ov_weights": ov or "fp32"} if backend != "torch" else {}
        if self.low_memory:
            kw["low_memory"] = True
        return Pipeline.load(self.model, drop=self.drop, precision=self.precision, **kw)


def cache_path(cache: Path, pipe, setting: Setting, seed: int, ps: PromptSet) -> Path:
    """The cache file of everything that determines the images: weights hash, timesteps, guidance,
    text encoders, precision, seed and prompt set."""
    guidance = pipe.sampling.guidance if setting.guidance is None else float(setting.guidance)
    # While MiniLM is the only encoder that can be dropped, key it as the bool it used to be, so that
    # caches written before `drop` existed stay valid.
    encoders = setting.minilm if set(setting.drop) <= {"minilm"} else list(setting.drop)
    parts = [pipe.hash, [round(float(t), 8) for t in pipe.timesteps(setting.steps)], guidance, encoders,
             setting.precision, seed, ps.sha]
    if setting.backend != "torch":  # another runtime draws (slightly) other images; torch keys stay as they were
        parts.append(setting.backend)
    drawn = drawn_captions(pipe, setting, ps)
    if drawn != ps.captions:  # style completion changed a prompt: key what was drawn (unchanged sets keep their keys)
        parts.append(hashlib.sha256("\n".join(drawn).encode()).hexdigest()[:16])
    key = json.dumps(parts)
    return Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


def drawn_captions(pipe, setting: Setting, ps: PromptSet) -> list[str]:
    """The prompts as the setting draws them (with the model's style completed unless the setting says not)."""
    return [pipe.complete(c) for c in ps.captions] if setting.complete_style else ps.captions


def generate_set(setting: Setting, ps: PromptSet, seed: int = 0, batch: int = 64, pipe=None,
                 cache: Path | None = None) -> tuple[torch.Tensor, dict | None]:
    """uint8 images (N, 3, H, W), one per prompt in order, and the summed phase timings (text_s,
    denoise_s, decode_s). With `cache`, a set generated before is read back and the timings are None:
    a cached set claims no speed."""
    from safetensors.torch import load_file, save

    pipe = pipe or setting.load()
    path = cache_path(cache, pipe, setting, seed, ps) if cache is not None else None
    if path is not None and path.exists():
        return load_file(path)["images"], None
    timings = dict.fromkeys(PHASES, 0.0)
    chunks = []
    caps = ps.captions
    for i in tqdm(range(0, len(caps), batch), desc=f"generate {setting.name}", leave=False):
        chunk = caps[i: i + batch]
        gen = pipe.run(chunk, [seed + i + j for j in range(len(chunk))], steps=setting.steps,
                       guidance=setting.guidance, complete_style=setting.complete_style)
        for k in PHASES:
            timings[k] += getattr(gen.timings, k)
        chunks.append(pil_to_u8(gen.images))
    images = torch.cat(chunks)
    if path is not None:
        with atomic_file(path, "wb") as f:
            f.write(save({"images": images}, metadata={"setting": setting.name}))
    return images, timings
