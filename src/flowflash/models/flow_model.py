"""The emoji flow network (an SD3-style MMDiT, models/mmdit.py, with diffusers' SD3Transformer2DModel's names and
numbers, + the light text encoder) and its model folder.

A model folder holds `config.json` (this module's `ModelConfig`: the architecture, name and kind, and the
sampling defaults apart from them) and the weights in the layout of `models/storage.py` (safetensors,
sharded with a standard index; fp16, or 8/6/4-bit weight-only quantized linear weights). MiniLM is
not stored: it comes from its package.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FlowflashError
from ..sampling import v_from_x0
from . import storage
from .mmdit import MMDiT
from .protocol import SamplingDefaults
from .text import LightEncoder, MiniLMEncoder

FORMAT = "flowflash-model-v2"
LEGACY_SAMPLING = {"shift": "shift", "default_steps": "steps", "default_guidance": "guidance", "schedule": "schedule"}


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
    # What the transformer outputs: "v" (velocity, SD3) or "x" (the clean image, converted to velocity).
    # x-prediction suits pixel space with large patches (192 values per token here): a clean image is
    # low-dimensional, noise is not (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
    prediction: str = "v"
    t_min: float = 0.05  # x-prediction divides by t; clamp it so the last steps stay well-conditioned
    name: str = "model"
    kind: str = "teacher"
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def transformer_kwargs(self) -> dict:
        hidden = self.num_heads * self.head_dim
        return dict(sample_size=self.image_size, patch_size=self.patch_size, in_channels=self.channels,
                    out_channels=self.channels, num_layers=self.num_layers, attention_head_dim=self.head_dim,
                    num_attention_heads=self.num_heads, joint_attention_dim=MiniLMEncoder.dim,
                    caption_projection_dim=hidden, pooled_projection_dim=self.light_dim + MiniLMEncoder.dim,
                    pos_embed_max_size=self.image_size // self.patch_size, qk_norm="rms_norm")

    def same_network(self, other: "ModelConfig") -> bool:
        """Whether weights of one fit the other (what merging branches and warm starts need)."""
        return self.transformer_kwargs() == other.transformer_kwargs() and self.vocab == other.vocab

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sampling"] = self.sampling.to_dict()
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read config.json; the first format (sampling fields flat beside the architecture) still reads."""
        d = dict(d)
        d.pop("format", None)
        legacy = {LEGACY_SAMPLING[k]: d.pop(k) for k in list(d) if k in LEGACY_SAMPLING}
        sampling = d.pop("sampling", None) or {}
        if legacy and sampling:
            raise FlowflashError("config.json mixes the old flat sampling fields with a 'sampling' block")
        sampling = {**legacy, **sampling}
        names = {f.name for f in dataclasses.fields(cls)} - {"sampling"}
        unknown = set(d) - names
        if unknown:
            raise FlowflashError(f"config.json has unknown fields: {sorted(unknown)}")
        s_names = {f.name for f in dataclasses.fields(SamplingDefaults)}
        if set(sampling) - s_names:
            raise FlowflashError(f"config.json's sampling block has unknown fields: {sorted(set(sampling) - s_names)}")
        return cls(**d, sampling=SamplingDefaults(**sampling))


class FlowModel(nn.Module):
    """Velocity network v(x_t, t, text). Timestep input is t in [0, 1]; the transformer sees 1000 t."""

    transformer_runner = None  # called in place of self.transformer when set (runtime/ov_backend.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.prediction not in ("v", "x"):
            raise FlowflashError(f"prediction must be 'v' or 'x', got {cfg.prediction!r}")
        if cfg.light_dim != MiniLMEncoder.dim:
            raise FlowflashError(f"light_dim must equal MiniLM's width {MiniLMEncoder.dim}, got {cfg.light_dim}")
        self.cfg = cfg
        self.transformer = MMDiT(**cfg.transformer_kwargs())  # diffusers' SD3Transformer2DModel, without diffusers
        self.light = LightEncoder(len(cfg.vocab) + 2, cfg.light_dim, cfg.light_max_tokens, cfg.light_layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        run = self.transformer_runner or self.transformer
        out = run(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                  timestep=t * 1000, return_dict=False)[0]
        if self.cfg.prediction == "x":  # an fp32 t must not promote a bf16 state
            return v_from_x0(x, t.clamp(min=self.cfg.t_min), out).to(x.dtype)
        return out

    def int8_keys(self) -> list[str]:
        """The matrices stored as int8 weight-only: every linear layer's weight (the light encoder's fused
        attention projection included). Embeddings, norms, biases and the patch convolution stay fp16."""
        keys = []
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                keys.append(f"{name}.weight")
            elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
                keys.append(f"{name}.in_proj_weight")
        return keys


def with_words(model: FlowModel, words: list[str]) -> FlowModel:
    """`model` with `words` it does not know appended to its vocabulary. Each new word's embedding starts as the
    unknown word's, which is what the model read for it before: outputs are unchanged until training moves
    them. Old ids keep their positions (the vocabulary only grows at the end)."""
    known = set(model.cfg.vocab)
    new = [w for w in dict.fromkeys(words) if w not in known]
    if not new:
        return model
    grown = FlowModel(dataclasses.replace(model.cfg, vocab=list(model.cfg.vocab) + new))
    state = model.state_dict()
    old = state["light.embed.weight"]
    unk = old[1:2].expand(len(new), -1)  # id 1: the unknown word (models/text.py WordTokenizer)
    state["light.embed.weight"] = torch.cat([old, unk.to(old.dtype)])
    grown.load_state_dict(state)
    return grown


STORAGES = ("fp16", "int8", "int6", "int4")
QUANT_GROUP = 32  # columns per scale at 6 and 4 bits


def save_model(model: FlowModel, folder: Path, storage_kind: str = "fp16", extra_files: dict | None = None,
               shard_bytes: int | None = None) -> Path:
    """Write config.json and the weights as one folder, atomically. int8: weight-only, per output channel;
    int6/int4: weight-only, packed, a scale per 32 columns. Only linear weights are quantized (int8_keys)."""
    if storage_kind not in STORAGES:
        raise FlowflashError(f"storage must be one of {', '.join(STORAGES)}, got {storage_kind!r}")
    files = {"config.json": json.dumps(model.cfg.to_dict(), indent=1), **(extra_files or {})}
    bits = int(storage_kind[3:]) if storage_kind.startswith("int") else 8
    storage.save_weights(model.state_dict(), Path(folder), dtype=torch.float16,
                         int8_keys=model.int8_keys() if storage_kind != "fp16" else (),
                         extra_files=files, bits=bits, group=QUANT_GROUP, shard_bytes=shard_bytes)
    return Path(folder)


def read_config(folder: Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise FlowflashError(f"model folder not found: {folder}")
    path = folder / "config.json"
    if not path.exists():
        raise FlowflashError(f"{folder} has no config.json")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise FlowflashError(f"{path} is not a valid model config: {e}") from None


def load_model(folder: Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> FlowModel:
    """Load a model folder, with one clear error for each way it can be wrong. keep_quantized: linear layers
    stored quantized keep their int8 values in memory and dequantize per call (same outputs, ~1/4 the
    memory for those weights; models/qlinear.py)."""
    from .qlinear import swap_in

    folder = Path(folder)
    cfg = read_config(folder)
    if keep_quantized:
        sd, quantized = storage.load_weights_quantized(folder, dtype)
    else:
        sd, quantized = storage.load_weights(folder, dtype), {}
    try:
        # Built once, on the meta device (no memory, no random init to throw away): the model that
        # validates the shapes is the one that takes the weights.
        with torch.device("meta"):
            model = FlowModel(cfg)
    except FlowflashError:
        raise
    except Exception as e:  # torch raises assorted types for impossible shapes
        raise FlowflashError(f"{folder / 'config.json'} describes an impossible model: {e}") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got = {**{k: v.shape for k, v in sd.items()}, **{k: q.shape for k, (q, _) in quantized.items()}}
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    bad = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or extra or bad:
        detail = "; ".join(s for s in (
            f"missing {len(missing)} tensors (e.g. {sorted(missing)[0]})" if missing else "",
            f"{len(extra)} unexpected tensors (e.g. {sorted(extra)[0]})" if extra else "",
            f"{len(bad)} shape mismatches (e.g. {bad[0]}: config {tuple(expected[bad[0]])}"
            f" vs weights {tuple(got[bad[0]])})" if bad else "") if s)
        raise FlowflashError(f"config.json does not match the weights in {folder}: {detail}")
    used = swap_in(model, quantized, sd, dtype, prefix="transformer.")  # the MMDiT: ~all the weights
    for key in set(quantized) - used:  # quantized weights of other layer kinds: dequantized as usual
        sd[key] = storage.dequantize(*quantized[key], dtype)
    # assign: the model that validated the shapes takes the loaded tensors as they are, no second copy.
    model.load_state_dict({k: v for k, v in sd.items() if k not in used}, strict=not used, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise FlowflashError(f"{folder}: no weights for {', '.join(left[:3])}")
    return model.eval().requires_grad_(False)


def with_config(model: FlowModel, **changes) -> FlowModel:
    """The same weights under a changed config (name, kind, sampling): what export and ship write."""
    out = FlowModel(dataclasses.replace(model.cfg, **changes))
    out.load_state_dict(model.state_dict())
    return out.eval().requires_grad_(False)
