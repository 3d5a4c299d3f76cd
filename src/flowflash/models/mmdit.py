"""A compact MMDiT: SD3's joint-attention transformer, for the configurations the emoji models use.

Why our own: importing diffusers' SD3Transformer2DModel costs ~2.5 s (it drags in every transformer class,
transformers and torch._dynamo), more than the rest of a one-image `flowflash generate` together.

The network is diffusers' `SD3Transformer2DModel` with `qk_norm="rms_norm"` and no dual-attention layers,
made to be interchangeable with it:
- parameter and buffer names and shapes are diffusers' (`pos_embed.pos_embed`, `transformer_blocks.3.attn.
  to_out.0.weight`, ...), so its state dicts load strictly, both ways;
- the submodules are created in diffusers' order with PyTorch's default inits, so a model built after
  `torch.manual_seed(s)` has the same initial weights as diffusers' built after the same seed;
- the forward does the same operations in the same order (dtype casts included), so outputs and gradients
  are the same numbers, in fp32, bf16/fp16 weights or under autocast.
Anything else diffusers' class accepts is refused with a FlowflashError (see `MMDiT.__init__`).

Shapes: image (B, C, H, W), text states (B, L, joint_attention_dim), pooled (B, pooled_projection_dim),
timestep (B,) in [0, 1000]; output (B, out_channels, H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import FlowflashError

EPS = 1e-6  # every norm in SD3's transformer (LayerNorms without affine, the q/k RMSNorms)
TIME_CHANNELS = 256  # width of the sinusoidal timestep features fed to the timestep MLP
FF_MULT = 4


@dataclass(frozen=True)
class MMDiTConfig:
    """The constructor's arguments, readable as `model.config.<name>` like diffusers' config."""

    sample_size: int
    patch_size: int
    in_channels: int
    out_channels: int
    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int
    qk_norm: str = "rms_norm"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------- fixed embeddings

def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M, dim): sin then cos of pos times frequencies 10000^(-k/(dim/2)); float64 as diffusers computes it."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int) -> Tensor:
    """(1, grid*grid, dim) fp32: token r*grid+c gets [sincos(column c), sincos(row r)] (x first, as SD3).
    Positions are scaled so that `base_size` patches span 0..base_size (diffusers' interpolation_scale 1).
    Always computed on the CPU: a model built under `with torch.device("meta")` (load_model) would otherwise
    send arange through PyTorch's Python decompositions, which import torch._dynamo (~1 s)."""
    coords = torch.arange(grid, dtype=torch.float32, device="cpu") / (grid / base_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.float().unsqueeze(0)


def timestep_features(timestep: Tensor, dim: int = TIME_CHANNELS) -> Tensor:
    """(B, dim) fp32: [cos | sin] of t times frequencies 10000^(-k/half) (flip_sin_to_cos, no freq shift)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(exponent / half)
    args = timestep[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------- layers

def _layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (the adaLN modulation supplies scale and shift)."""
    return F.layer_norm(x, (x.shape[-1],), None, None, EPS)


class RMSNorm(nn.Module):
    """Per-head RMS norm of queries and keys. Normalizes in fp32 and, like diffusers, casts back only when the
    weight is half precision (so under autocast with fp32 weights q and k leave it in fp32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + EPS)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class AdaLNZero(nn.Module):
    """adaLN-Zero: the conditioning gives shift/scale/gate for attention and for the MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(emb)).chunk(6, dim=1)
        x = _layer_norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLNContinuous(nn.Module):
    """Scale-then-shift modulation only: the last block's text input and the output norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = torch.chunk(self.linear(F.silu(emb).to(x.dtype)), 2, dim=1)
        return _layer_norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class _TwoLayerMLP(nn.Module):
    """linear_1, SiLU, linear_2: the timestep and pooled-text embedders."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """The block conditioning: timestep MLP + pooled-text MLP."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = _TwoLayerMLP(TIME_CHANNELS, dim)
        self.text_embedder = _TwoLayerMLP(pooled_dim, dim)

    def forward(self, timestep: Tensor, pooled: Tensor) -> Tensor:
        t = self.timestep_embedder(timestep_features(timestep).to(dtype=pooled.dtype))
        return t + self.text_embedder(pooled)


class _GeluProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear, tanh-GELU, linear. `net[1]` stands where diffusers has a p=0 dropout, keeping `net.2` as the
    output layer's name."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(_GeluProj(dim, FF_MULT * dim), nn.Identity(), nn.Linear(FF_MULT * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class JointAttention(nn.Module):
    """One softmax attention over [image tokens, text tokens], each stream with its own projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        # creation order = diffusers' Attention (it fixes the seeded init)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_k_proj, self.add_v_proj, self.add_q_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # [1]: diffusers' p=0 dropout
        # the last block's text output is never read: no text output projection there
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor | None]:
        b, n, head_dim = x.shape[0], x.shape[1], self.head_dim

        def split(t: Tensor) -> Tensor:  # (B, N, heads*hd) -> (B, heads, N, hd)
            return t.view(b, -1, self.heads, head_dim).transpose(1, 2)

        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q, k, v = split(q), split(k), split(v)
        q, k = self.norm_q(q), self.norm_k(k)
        cq, ck, cv = self.add_q_proj(context), self.add_k_proj(context), self.add_v_proj(context)
        cq, ck, cv = split(cq), split(ck), split(cv)
        cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * head_dim).to(q.dtype)
        x_out, ctx_out = out[:, :n], out[:, n:]
        if self.to_add_out is not None:
            ctx_out = self.to_add_out(ctx_out)
        return self.to_out[0](x_out), ctx_out


class JointTransformerBlock(nn.Module):
    """MMDiT block: separate weights per stream, joint attention. Returns (text, image) as diffusers' block
    does (FeatureTap in methods/dmd2.py reads output[1]); the context-pre-only last block returns text None."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLNZero(dim)
        self.norm1_context = AdaLNContinuous(dim) if context_pre_only else AdaLNZero(dim)
        self.attn = JointAttention(dim, heads, head_dim, context_pre_only)
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                temb: Tensor) -> tuple[Tensor | None, Tensor]:
        x, ctx = hidden_states, encoder_hidden_states
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nctx = self.norm1_context(ctx, temb)
        else:
            nctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, temb)
        attn, ctx_attn = self.attn(nx, nctx)

        x = x + gate_msa.unsqueeze(1) * attn
        nx = _layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * self.ff(nx)
        if self.context_pre_only:
            return None, x

        ctx = ctx + c_gate_msa.unsqueeze(1) * ctx_attn
        nctx = _layer_norm(ctx) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        ctx = ctx + c_gate_mlp.unsqueeze(1) * self.ff_context(nctx)
        return ctx, x


class PatchEmbed(nn.Module):
    """Patchify with a strided convolution, add the centre crop of a fixed 2-D sincos position table."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int, max_size: int):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=(patch_size, patch_size), stride=patch_size)
        # Saved with the weights (diffusers does); recomputed identically for a fresh model.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, max_size, sample_size // patch_size))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise FlowflashError(f"a {x.shape[-2]}x{x.shape[-1]} input has {h}x{w} patches; this transformer's "
                                 f"position table holds {self.max_size}x{self.max_size}")
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w, :]
        return (x + pos.reshape(1, -1, pos.shape[-1])).to(x.dtype)


# ---------------------------------------------------------------- the model

class MMDiT(nn.Module):
    """SD3Transformer2DModel's network for `ModelConfig.transformer_kwargs()` (see the module docstring)."""

    def __init__(self, *, sample_size: int, patch_size: int, in_channels: int, out_channels: int, num_layers: int,
                 attention_head_dim: int, num_attention_heads: int, joint_attention_dim: int,
                 caption_projection_dim: int, pooled_projection_dim: int, pos_embed_max_size: int,
                 qk_norm: str | None = "rms_norm", dual_attention_layers: tuple[int, ...] = (), **other):
        super().__init__()
        if other:
            raise FlowflashError(f"MMDiT does not take {', '.join(sorted(other))} (diffusers' SD3 options beyond "
                                 "what flowflash's emoji models use)")
        if qk_norm != "rms_norm":
            raise FlowflashError(f"MMDiT normalizes queries and keys with qk_norm='rms_norm' only, got {qk_norm!r}")
        if tuple(dual_attention_layers):
            raise FlowflashError("MMDiT has no dual-attention (SD3.5) layers: dual_attention_layers must be empty")
        cfg = MMDiTConfig(sample_size, patch_size, in_channels, out_channels, num_layers, attention_head_dim,
                          num_attention_heads, joint_attention_dim, caption_projection_dim, pooled_projection_dim,
                          pos_embed_max_size, qk_norm)
        for name, value in vars(cfg).items():
            if name != "qk_norm" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise FlowflashError(f"MMDiT's {name} must be a positive integer, got {value!r}")
        dim = cfg.inner_dim
        if caption_projection_dim != dim:
            raise FlowflashError(f"MMDiT's caption_projection_dim must equal heads x head_dim = {dim} (joint "
                                 f"attention shares the width), got {caption_projection_dim}")
        if dim % 4:
            raise FlowflashError(f"the 2-D sincos position embedding needs a width divisible by 4, got {dim}")
        self.config = cfg

        # creation order = diffusers' (fixes the seeded init)
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, dim, pos_embed_max_size)
        self.time_text_embed = TimeTextEmbed(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_attention_heads, attention_head_dim, context_pre_only=i == num_layers - 1)
            for i in range(num_layers))
        self.norm_out = AdaLNContinuous(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                timestep: Tensor, return_dict: bool = False) -> tuple[Tensor]:
        if return_dict:
            raise FlowflashError("MMDiT returns a tuple (output,): call it with return_dict=False")
        if timestep.dim() != 1:
            raise FlowflashError(f"timestep must be one value per image, shape (B,), got {tuple(timestep.shape)}")
        n, _, height, width = hidden_states.shape
        p, c = self.config.patch_size, self.config.out_channels

        x = self.pos_embed(hidden_states).contiguous()  # the transpose in patchify leaves it strided
        temb = self.time_text_embed(timestep, pooled_projections)
        ctx = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
        x = self.proj_out(self.norm_out(x, temb))

        # unpatchify: token (i, j) holds its p x p x c patch; (n, h, w, p, q, c) -> (n, c, h, p, w, q)
        h, w = height // p, width // p
        x = x.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return (x.reshape(n, c, h * p, w * p),)
