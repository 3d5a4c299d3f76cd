"""Training data of an SD3 teacher: prompts, their text embeddings computed once, optional real latents.

Distillation needs no images: a batch is prompts (as cached embeddings) plus starting noise. The embeddings of
every encoder the run keeps are computed once into a safetensors file named by a key of the encoders' weights,
the prompt list, the dropped encoders and T5's length; a second run with the same key loads no encoder at all.
Real images (the adversarial heads' real branch) are VAE-encoded once the same way. Draws are made for the
global batch and sliced per rank, so a run's data does not depend on how many processes share it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from tqdm import tqdm

from ..errors import FlowflashError
from ..fsutil import atomic_file
from .common import Dist, barrier

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
CLIP_TOKENS = 77  # SD3's context: both CLIPs' 77 token states, then T5's sequence


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flowflash" / "embeddings"


# ------------------------------------------------------------------ prompts
def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (blank lines and lines starting with # skipped), or JSONL with a `prompt` field."""
    path = Path(path)
    if not path.is_file():
        raise FlowflashError(f"prompt file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FlowflashError(f"{path}:{n} is not valid JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise FlowflashError(f"{path}:{n} has no string 'prompt' field")
            prompts.append(row["prompt"])
    else:
        prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise FlowflashError(f"prompt file {path} holds no prompts")
    return prompts


# ------------------------------------------------------------------ fingerprints
def folder_fingerprint(folder: Path, parts: list[str]) -> str:
    """sha256 over the named components' files: each one's name, size, modification time and first MiB (small
    files, configs and tokenizers, whole): a changed encoder changes it, and multi-GB files are not read through."""
    h = hashlib.sha256()
    for part in parts:
        for f in sorted(p for p in (Path(folder) / part).rglob("*") if p.is_file()):
            st = f.stat()  # the modification time too: an edit past the first MiB keeps the size
            h.update(f"{part}/{f.relative_to(Path(folder) / part)}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]):
    """A safetensors cache file, written whole or not at all (fsutil.atomic_file)."""
    with atomic_file(path) as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


# ------------------------------------------------------------------ text embeddings
@dataclass
class PromptBank:
    """Every prompt's (context, pooled) and the empty prompt's (CFG's unconditional rows), read lazily."""
    path: Path
    prompts: list[str]
    context_len: int  # 77 + T5 length: rows stored without T5 are padded with its zeros
    null_ctx: Tensor
    null_pooled: Tensor
    encoded_now: bool  # False when the cache was reused (no encoder loaded)

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        with safe_open(self.path, "pt") as f:
            ctx_s, pooled_s = f.get_slice("ctx"), f.get_slice("pooled")
            ctx = torch.cat([ctx_s[i: i + 1] for i in idx.tolist()]).float()
            pooled = torch.cat([pooled_s[i: i + 1] for i in idx.tolist()]).float()
        return self.pad(ctx), pooled

    def pad(self, ctx: Tensor) -> Tensor:
        return torch.nn.functional.pad(ctx, (0, 0, 0, self.context_len - ctx.shape[1]))


def embedding_key(teacher: Path, prompts: list[str], drop: frozenset[str], max_sequence_length: int) -> str:
    from ..models.sd3 import ENCODERS

    kept = [part for name, parts in ENCODERS.items() if name not in drop for part in parts]
    h = hashlib.sha256(folder_fingerprint(teacher, kept).encode())
    h.update(json.dumps({"prompts": prompts, "drop": sorted(drop), "t5_len": max_sequence_length}).encode())
    return h.hexdigest()[:20]


def prompt_bank(teacher: Path, prompts: list[str], drop: frozenset[str], max_sequence_length: int,
                cache_dir: Path, d: Dist, batch: int = 16, device: str | torch.device = "cpu") -> PromptBank:
    """The cached embeddings of `prompts`, computed (by rank 0, the others wait) when no cache has this key; on
    an accelerator the encoders run there in bf16 (T5-XXL in fp32 on a CPU would hold the whole run up)."""
    path = Path(cache_dir) / f"text-{embedding_key(teacher, prompts, drop, max_sequence_length)}.safetensors"
    encoded = not path.exists()
    if encoded and d.main:
        encode_prompts(teacher, prompts, drop, max_sequence_length, path, batch, torch.device(device))
    barrier(d)
    with safe_open(path, "pt") as f:
        null_ctx, null_pooled = f.get_tensor("null_ctx").float(), f.get_tensor("null_pooled").float()
    bank = PromptBank(path, prompts, CLIP_TOKENS + max_sequence_length, null_ctx, null_pooled, encoded)
    bank.null_ctx = bank.pad(null_ctx)
    return bank


@torch.no_grad()
def encode_prompts(teacher: Path, prompts: list[str], drop: frozenset[str], max_sequence_length: int, path: Path,
                   batch: int, device: torch.device = torch.device("cpu")):
    from ..models.sd3 import SD3TextEncoders

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    enc = SD3TextEncoders.load(teacher, drop, max_sequence_length, dtype).to(device)
    keep = None if "t5" in drop else CLIP_TOKENS + max_sequence_length  # T5's zeros are not stored
    ctx, pooled = [], []
    for i in tqdm(range(0, len(prompts), batch), desc="encode prompts", leave=False):
        c, p, _ = enc.encode_text(prompts[i: i + batch], drop)
        ctx.append(c[:, :keep].half().cpu()), pooled.append(p.half().cpu())
    nc, npool, _ = enc.encode_text([""], drop)
    atomic_save({"ctx": torch.cat(ctx), "pooled": torch.cat(pooled), "null_ctx": nc[:, :keep].half().cpu(),
                 "null_pooled": npool.half().cpu()}, path, {"teacher": str(teacher), "prompts": str(len(prompts))})


# ------------------------------------------------------------------ real images
def image_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FlowflashError(f"real image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FlowflashError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def fit(image, size: tuple[int, int]):
    """Resize so the image covers `size`, then centre-crop to it."""
    from PIL import Image

    w, h = size
    s = max(w / image.width, h / image.height)
    image = image.convert("RGB").resize((max(w, round(image.width * s)), max(h, round(image.height * s))),
                                        Image.Resampling.BICUBIC)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def real_latents(teacher: Path, folder: Path, size: tuple[int, int], cache_dir: Path, d: Dist) -> Tensor:
    """VAE latents (posterior mean, scaled and shifted as SD3 trains) of every image in `folder`, cached."""
    files = image_files(folder)
    h = hashlib.sha256(folder_fingerprint(teacher, ["vae"]).encode())
    h.update(json.dumps([size, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]).encode())
    path = Path(cache_dir) / f"real-{h.hexdigest()[:20]}.safetensors"
    if not path.exists() and d.main:
        encode_images(teacher, files, size, path)
    barrier(d)
    with safe_open(path, "pt") as f:
        return f.get_tensor("latents").float()


@torch.no_grad()
def encode_images(teacher: Path, files: list[Path], size: tuple[int, int], path: Path, batch: int = 8):
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image, UnidentifiedImageError

    from ..models.sd3 import load_component

    vae = load_component(AutoencoderKL, teacher, "vae", torch.float32).eval()
    c, out = vae.config, []
    for i in tqdm(range(0, len(files), batch), desc="encode real images", leave=False):
        pix = []
        for f in files[i: i + batch]:
            try:
                pix.append(torch.from_numpy(np.array(fit(Image.open(f), size))).permute(2, 0, 1))
            except (UnidentifiedImageError, OSError) as e:
                raise FlowflashError(f"cannot read image {f}: {e}") from None
        x = torch.stack(pix).float() / 127.5 - 1
        out.append((vae.encode(x).latent_dist.mode() - c.shift_factor) * c.scaling_factor)
    atomic_save({"latents": torch.cat(out)}, path, {"teacher": str(teacher), "images": str(len(files))})


# ------------------------------------------------------------------ batches
@dataclass
class LatentBatch:
    ctx: Tensor  # (B, L, D) cached text states
    pooled: Tensor  # (B, P)
    null_ctx: Tensor  # (1, L, D): the empty prompt, CFG's unconditional branch
    null_pooled: Tensor  # (1, P)
    noise: Tensor  # (B, C, h, w) starting latents of a student rollout
    real: Tensor | None = None  # real latents (unpaired with the prompts), or None
    key: Tensor | None = None  # positions in a fixed pool (tg_pool), else None

    def to(self, device) -> "LatentBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return LatentBatch(*(move(getattr(self, f)) for f in
                             ("ctx", "pooled", "null_ctx", "null_pooled", "noise", "real", "key")))

    def rows(self, idx: Tensor) -> "LatentBatch":
        pick = lambda t: None if t is None else t[idx]
        return replace(self, ctx=self.ctx[idx], pooled=self.pooled[idx], noise=self.noise[idx],
                       real=pick(self.real), key=pick(self.key))

    def for_teacher(self) -> "LatentBatch":
        return self  # teacher and student are asked the same prompts

    def condition(self, model, use: Tensor, use_other: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(context, pooled) with the rows not in `use` replaced by the empty prompt's. The encoders are not
        part of any role, so `model` and the second mask (the emoji model's second encoder) are unused."""
        m = use.view(-1, 1, 1).to(self.ctx.device)
        ctx = torch.where(m, self.ctx, self.null_ctx.to(self.ctx.dtype))
        pooled = torch.where(m[:, :, 0], self.pooled, self.null_pooled.to(self.pooled.dtype))
        return ctx, pooled


class PromptSampler:
    """Batches of cached prompts and fresh noise (or, with `pool`, entries of a fixed (prompt, noise) pool
    drawn once from `pool_seed`). Rows and noise are drawn for the global batch and this rank takes its slice."""

    global_draws = True  # the loop seeds the data generator alike on every rank

    def __init__(self, bank: PromptBank, latent_shape: tuple[int, int, int], d: Dist, real: Tensor | None = None,
                 pool: int = 0, pool_seed: int = 0):
        self.bank, self.shape, self.d, self.real = bank, latent_shape, d, real
        self.pool_idx = self.pool_noise = None
        if pool:
            g = torch.Generator().manual_seed(pool_seed)
            self.pool_idx = torch.randint(len(bank), (pool,), generator=g)
            self.pool_noise = torch.randn((pool, *latent_shape), generator=g)

    def __call__(self, n: int, gen: torch.Generator) -> LatentBatch:
        total, mine = n * self.d.world, slice(self.d.rank * n, (self.d.rank + 1) * n)
        key = None
        if self.pool_idx is not None:
            key = torch.randint(len(self.pool_idx), (total,), generator=gen)[mine]
            idx, noise = self.pool_idx[key], self.pool_noise[key]
        else:
            idx = torch.randint(len(self.bank), (total,), generator=gen)[mine]
            noise = torch.randn((total, *self.shape), generator=gen)[mine]
        real = None
        if self.real is not None:
            real = self.real[torch.randint(len(self.real), (total,), generator=gen)[mine]]
        ctx, pooled = self.bank.rows(idx)
        return LatentBatch(ctx, pooled, self.bank.null_ctx, self.bank.null_pooled, noise, real, key)
