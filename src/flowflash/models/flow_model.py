"""The text-to-image flow model: SD3Transformer2DModel + the light text encoder, and its folder format.

A model folder holds `config.json` (this module's `ModelConfig`) and `model.safetensors`
(fp16 or fp32; keys `transformer.*` and `light.*`), or, above `SHARD_BYTES`, the same tensors split over
`model-00001-of-0000N.safetensors` files (so no committed file exceeds the repository's 20 MB limit). MiniLM is not stored: it comes from its package.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FlowflashError
from .text import LightEncoder, MiniLMEncoder, TextConditioner, WordTokenizer

FORMAT = "flowflash-model-v1"


@dataclass
class ModelConfig:
    image_size: int = 64
    channels: int = 3
    patch_size: int = 8
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 64
    light_dim: int = 384
    light_layers: int = 1
    light_max_tokens: int = 24
    minilm_max_tokens: int = 24
    vocab: list[str] = field(default_factory=list)
    # sampling defaults recorded with the weights
    shift: float = 1.5
    default_steps: int = 50
    default_guidance: float = 4.0
    schedule: list[float] | None = None  # a distilled student's fixed timesteps (1 -> 0)
    # What the transformer outputs: "v" (velocity, SD3) or "x" (the clean image, converted to velocity).
    # x-prediction suits pixel space with large patches (192 values per token here): a clean image is
    # low-dimensional, noise is not (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
    prediction: str = "v"
    t_min: float = 0.05  # x-prediction divides by t; clamp it so the last steps stay well-conditioned
    name: str = "model"
    kind: str = "teacher"

    def transformer_kwargs(self) -> dict:
        hidden = self.num_heads * self.head_dim
        return dict(sample_size=self.image_size, patch_size=self.patch_size, in_channels=self.channels,
                    out_channels=self.channels, num_layers=self.num_layers, attention_head_dim=self.head_dim,
                    num_attention_heads=self.num_heads, joint_attention_dim=MiniLMEncoder.dim,
                    caption_projection_dim=hidden, pooled_projection_dim=self.light_dim + MiniLMEncoder.dim,
                    pos_embed_max_size=self.image_size // self.patch_size, qk_norm="rms_norm")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"format"}
        if unknown:
            raise FlowflashError(f"config.json has unknown fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


class FlowModel(nn.Module):
    """Velocity model v(x_t, t, text). Timestep input is t in [0, 1]; the transformer sees 1000 t."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        if cfg.prediction not in ("v", "x"):
            raise FlowflashError(f"prediction must be 'v' or 'x', got {cfg.prediction!r}")
        if cfg.light_dim != MiniLMEncoder.dim:
            raise FlowflashError(f"light_dim must equal MiniLM's width {MiniLMEncoder.dim}, got {cfg.light_dim}")
        self.cfg = cfg
        self.transformer = SD3Transformer2DModel(**cfg.transformer_kwargs())
        self.light = LightEncoder(len(cfg.vocab) + 2, cfg.light_dim, cfg.light_max_tokens, cfg.light_layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        out = self.transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                               timestep=t * 1000, return_dict=False)[0]
        if self.cfg.prediction == "x":  # x_t = (1 - t) x0 + t eps  =>  v = (x_t - x0) / t
            return (x - out) / t.clamp(min=self.cfg.t_min).view(-1, *([1] * (x.dim() - 1)))
        return out


SHARD_BYTES = 18 * 1024 * 1024


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: one model.safetensors, or every shard of a complete set."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        n = int(shards[0].stem.rsplit("-of-", 1)[1])
        want = [folder / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        missing = [p.name for p in want if not p.exists()]
        if missing:
            raise FlowflashError(f"{folder} lacks weight shards: {', '.join(missing)}")
        return want
    return []


def state_dict_hash(folder: Path) -> str:
    """Short sha256 over the weight files, for the PNG metadata."""
    h = hashlib.sha256()
    for path in weight_files(folder):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:10]


def _shards(sd: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    out, cur, size = [], {}, 0
    for k, v in sd.items():
        b = v.numel() * v.element_size()
        if cur and size + b > limit:
            out.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + b
    return out + [cur]


def save_model(model: FlowModel, folder: Path, dtype: torch.dtype = torch.float16, extra_files: dict | None = None):
    """Write config.json + the weights (sharded above SHARD_BYTES) atomically: temp folder, then rename."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    shards = _shards(sd, SHARD_BYTES)
    for i, part in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, tmp / name, metadata={"format": FORMAT})
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(model.cfg)}, indent=1))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> FlowModel:
    """Load a model folder, with one clear error for each way it can be wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FlowflashError(f"model folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FlowflashError(f"{folder} has no config.json")
    w_paths = weight_files(folder)
    if not w_paths:
        pickles = [p.name for p in folder.iterdir() if p.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"}]
        if pickles:
            raise FlowflashError(f"{folder} holds pickle weights ({', '.join(pickles)}); "
                                 "flowflash loads only safetensors and never unpickles")
        raise FlowflashError(f"{folder} has no model.safetensors")
    try:
        cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise FlowflashError(f"{cfg_path} is not a valid model config: {e}") from None
    sd = {}
    for w_path in w_paths:
        try:
            sd.update(load_file(w_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise FlowflashError(f"{w_path} is truncated or corrupt: {e}") from None
    try:
        # Built once, for real: the model that validates the shapes is the one that takes the weights.
        model = FlowModel(cfg)
    except Exception as e:  # diffusers raises assorted types for impossible shapes
        raise FlowflashError(f"{cfg_path} describes an impossible model: {e}") from None
    expected = model.state_dict()
    missing, extra = set(expected) - set(sd), set(sd) - set(expected)
    bad = [k for k in set(expected) & set(sd) if expected[k].shape != sd[k].shape]
    if missing or extra or bad:
        detail = "; ".join(s for s in (
            f"missing {len(missing)} tensors (e.g. {sorted(missing)[0]})" if missing else "",
            f"{len(extra)} unexpected tensors (e.g. {sorted(extra)[0]})" if extra else "",
            f"{len(bad)} shape mismatches (e.g. {sorted(bad)[0]}: config {tuple(expected[sorted(bad)[0]].shape)}"
            f" vs weights {tuple(sd[sorted(bad)[0]].shape)})" if bad else "") if s)
        raise FlowflashError(f"config.json does not match the weights in {folder}: {detail}")
    # assign: the model that validated the shapes takes the loaded tensors as they are, no second copy.
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return model.eval().requires_grad_(False)


def make_conditioner(model: FlowModel, with_minilm: bool = True) -> TextConditioner:
    n = model.cfg.minilm_max_tokens
    return TextConditioner(WordTokenizer(model.cfg.vocab), model.light,
                           MiniLMEncoder(max_tokens=n) if with_minilm else None, n)
