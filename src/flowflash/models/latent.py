"""An SD3 pipeline's transformer as a distillation role (teacher, student or critic), in the VAE latent space.

Training holds only transformers: text embeddings come from the cache (train/prompts.py) and the VAE is
used once, for real images. `LatentFlow` gives a transformer the call the methods use for every role,
`role(x, t, context, pooled) -> velocity` with t in [0, 1], and the facts the methods read of a teacher:
its sampling shift, its feature width and the latent shape at the training size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .protocol import SamplingDefaults


@dataclass(frozen=True)
class LatentConfig:
    folder: str  # the teacher's diffusers folder (configs, VAE and encoders are taken from there on export)
    sampling: SamplingDefaults
    latent_shape: tuple[int, int, int]  # (C, H, W) at the training size
    size: tuple[int, int]  # (width, height) in pixels
    num_heads: int
    head_dim: int
    drop: tuple[str, ...] = ()  # text encoders the run trains without (their embeddings are zeros)


class LatentFlow(nn.Module):
    """Velocity of an SD3Transformer2DModel, v(x_t, t | context, pooled); the transformer sees 1000 t."""

    def __init__(self, transformer: nn.Module, cfg: LatentConfig):
        super().__init__()
        self.transformer = transformer  # the name FeatureTap and the exporters look for
        self.cfg = cfg

    @property
    def feature_width(self) -> int:
        return self.cfg.num_heads * self.cfg.head_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context,
                                pooled_projections=pooled, return_dict=False)[0]

    @classmethod
    def load(cls, folder: Path, size: int | tuple[int, int] | None, dtype: torch.dtype = torch.float32,
             drop=()) -> "LatentFlow":
        """The transformer of a diffusers SD3 folder (nothing else is read), checked against the size."""
        from diffusers import SD3Transformer2DModel

        from .sd3 import load_component, quiet_loaders, read_index, scheduler_shift, size_rule

        quiet_loaders()
        folder = Path(folder)
        read_index(folder)
        transformer = load_component(SD3Transformer2DModel, folder, "transformer", dtype)
        c = transformer.config
        w, h, vae_scale = size_rule(folder, c, size)
        sampling = SamplingDefaults(steps=28, guidance=7.0, shift=scheduler_shift(folder))
        cfg = LatentConfig(str(folder), sampling, (c.in_channels, h // vae_scale, w // vae_scale), (w, h),
                           c.num_attention_heads, c.attention_head_dim, tuple(sorted(drop)))
        return cls(transformer.eval().requires_grad_(False), cfg)
