"""The emoji model behind the generation protocol: pixel space, two text encoders.

`light` (word-level, trained with the transformer, CLIP's role) and `minilm` (frozen all-MiniLM-L6-v2,
T5's role) are each droppable: a dropped encoder's output is nulled (zeros), which is exactly what the
per-encoder dropout of training showed the transformer, so dropping one is in-distribution.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import FlowflashError
from ..images import to_uint8, to_unit
from .flow_model import FlowModel, load_model
from .protocol import Conditioning, SamplingDefaults, check_drop
from .text import MiniLMEncoder, WordTokenizer, combine


class EmojiModel:
    encoder_names = ("light", "minilm")

    def __init__(self, net: FlowModel, minilm: MiniLMEncoder | None):
        self.net, self.minilm = net, minilm
        self.tokenizer = WordTokenizer(net.cfg.vocab)

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype = torch.float32, drop=(), low_memory: bool = False) -> "EmojiModel":
        """low_memory: stored-quantized linear weights stay int8 in memory (dequantized per call)."""
        drop = check_drop(drop, cls.encoder_names)
        net = load_model(folder, dtype, keep_quantized=low_memory)
        return cls(net, None if "minilm" in drop else MiniLMEncoder(max_tokens=net.cfg.minilm_max_tokens))

    @property
    def name(self) -> str:
        return self.net.cfg.name

    @property
    def sampling(self) -> SamplingDefaults:
        return self.net.cfg.sampling

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.transformer.parameters()).dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.net.transformer

    def compile(self) -> None:
        self.net.transformer.compile()  # pixel space: nothing to decode

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> "EmojiModel":
        self.net.to(device)  # MiniLM stays on the CPU: it encodes a few prompts per call
        return self

    def timesteps(self, steps: int | None, size: tuple[int, int] | None = None) -> Tensor:
        return self.sampling.timesteps(steps)

    def check_size(self, size: int | tuple[int, int] | None) -> tuple[int, int]:
        s = self.net.cfg.image_size
        wh = (s, s) if size is None else (size, size) if isinstance(size, int) else tuple(size)
        if wh != (s, s):
            raise FlowflashError(f"this model makes {s}x{s} images only, not {wh[0]}x{wh[1]}")
        return wh

    def condition(self, prompts: list[str], drop: frozenset[str], cfg: bool,
                  negative: list[str] | None = None) -> Conditioning:
        ids, mh, mp, notes = self._encode(prompts, drop)
        dev, b = self.device, len(prompts)
        on = torch.ones(b, dtype=torch.bool, device=dev)
        ctx, pooled = combine(self.net.light, ids, mh, mp, on & ("light" not in drop), on & ("minilm" not in drop))
        if cfg:
            if negative is None:  # the null: both encoders zeroed, as caption dropout trained it
                off = torch.zeros(b, dtype=torch.bool, device=dev)
                uctx, upooled = combine(self.net.light, ids, mh, mp, off, off)
            else:  # a negative prompt's own encoding in the unconditional rows
                nids, nmh, nmp, _ = self._encode(negative, drop)
                uctx, upooled = combine(self.net.light, nids, nmh, nmp, on & ("light" not in drop),
                                        on & ("minilm" not in drop))
            ctx, pooled = torch.cat([ctx, uctx]), torch.cat([pooled, upooled])
        return Conditioning(ctx.to(self.dtype), pooled.to(self.dtype), notes)

    def fits(self, prompt: str, drop: frozenset[str] = frozenset()) -> bool:
        """Whether every text encoder in use takes the whole prompt (no truncation warning)."""
        c = self.net.cfg
        return ("light" in drop or self.tokenizer.fits(prompt, c.light_max_tokens)) and (
            self.minilm is None or "minilm" in drop or self.minilm.fits(prompt))

    def _encode(self, prompts: list[str], drop: frozenset[str]) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        """Light-encoder ids and MiniLM states (zeros when MiniLM is dropped), on the model's device."""
        c, b = self.net.cfg, len(prompts)
        ids, cut_light = self.tokenizer.batch(prompts, c.light_max_tokens)
        # a dropped encoder's input is zeroed, so its cut is no news
        cut_light = cut_light and "light" not in drop
        notes = [f"prompt longer than {c.light_max_tokens} words: truncated"] if cut_light else []
        if self.minilm is None or "minilm" in drop:
            mh = torch.zeros(b, c.minilm_max_tokens, MiniLMEncoder.dim)
            mp = torch.zeros(b, MiniLMEncoder.dim)
        else:
            mh, mp, cut_mini = self.minilm.encode(prompts)
            mh, mp = mh.float(), mp.float()
            if cut_mini:
                notes.append(f"prompt longer than {c.minilm_max_tokens} MiniLM tokens: truncated")
        dev = self.device
        return ids.to(dev), mh.to(dev), mp.to(dev), notes

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.net(x, t, cond.context, cond.pooled)

    def noise(self, seeds: list[int], size: tuple[int, int]) -> Tensor:
        """Each image's noise depends on its own seed only, whatever the batch."""
        w, h = size
        c = self.net.cfg.channels
        return torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(s))
                            for s in seeds]).to(self.device, self.dtype)

    def decode(self, x: Tensor) -> Tensor:
        return to_uint8(x.float()).cpu()

    def encode(self, images_u8: Tensor) -> Tensor:
        return to_unit(images_u8).to(self.device, self.dtype)
