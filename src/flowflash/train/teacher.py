"""Teacher training: rectified flow with logit-normal timesteps, SD3 shift, caption and encoder dropout."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..data.dataset import load_concept_list, load_corpus, to_unit
from ..errors import FlowflashError
from ..models.flow_model import FlowModel, ModelConfig, save_model
from ..models.text import MiniLMEncoder, TextConditioner, WordTokenizer
from ..sampling import time_shift
from .common import (EMA, GracefulStop, all_reduce_mean, barrier, check_finite, init_dist, load_checkpoint,
                     save_checkpoint)
from .grid import sample_grid


@dataclass
class TeacherConfig:
    data: str = "data/emoji64"
    out: str = "runs/teacher"
    model: dict = field(default_factory=dict)  # ModelConfig fields
    steps: int = 2000
    batch_size: int = 64  # global, split across ranks
    lr: float = 3e-4
    warmup: int = 200
    # Cosine decay from lr to min_lr over [decay_start, steps]; None keeps lr constant after warmup.
    decay_start: int | None = None
    min_lr: float = 3e-5
    # Probability that a batch row is a single emoji rather than a scene; None samples rows uniformly.
    # Singles are a quarter of the corpus but carry most of the identity a person checks.
    p_single: float | None = None
    # Curated concept list for the single-emoji rows (a list in data/concepts/ such as "core", or a
    # file); None trains on every concept. Scenes are kept whole: their objects are all in "core".
    concepts: str | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    logit_mean: float = 0.0
    logit_std: float = 1.0
    p_uncond: float = 0.1  # both encoders nulled: the CFG unconditional branch
    p_drop_light: float = 0.15  # independent encoder dropout (SD3), so either can be nulled at inference
    p_drop_minilm: float = 0.15
    seed: int = 0
    # Continue from a shipped model folder (fp16 weights, fresh optimizer): how a new session extends
    # training when only the committed weights survived. Its config and vocabulary are kept.
    init_from: str | None = None
    log_every: int = 10
    sample_every: int = 250
    ckpt_every: int = 100
    sample_prompts: list = field(default_factory=lambda: [
        "grinning face, twemoji style", "red apple, fluent flat style", "dog face, twemoji style",
        "pizza, fluent flat style", "a frog to the left of a banana on a blue background, twemoji style",
        "two penguin on a yellow background, fluent flat style", "cat face, fluent flat style",
        "watermelon, twemoji style"])


def sample_t(b: int, cfg: TeacherConfig, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps (SD3), then the resolution shift."""
    t = torch.sigmoid(torch.randn(b, generator=gen) * cfg.logit_std + cfg.logit_mean)
    return time_shift(t, shift)


def learning_rate(cfg: TeacherConfig, step: int) -> float:
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.decay_start is None or step < cfg.decay_start:
        return lr
    frac = min(1.0, (step - cfg.decay_start) / max(1, cfg.steps - cfg.decay_start))
    return cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def draw_rows(b: int, singles: torch.Tensor, scenes: torch.Tensor, p_single: float | None,
              gen: torch.Generator) -> torch.Tensor:
    if p_single is None or len(singles) == 0 or len(scenes) == 0:
        pool = torch.cat([singles, scenes])  # rows in manifest order when nothing is filtered out
        return pool[torch.randint(len(pool), (b,), generator=gen)]
    pick_single = torch.rand(b, generator=gen) < p_single
    s = singles[torch.randint(len(singles), (b,), generator=gen)]
    c = scenes[torch.randint(len(scenes), (b,), generator=gen)]
    return torch.where(pick_single, s, c)


def flow_matching_loss(model, x0, t, eps, ctx, pooled):
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    return F.mse_loss(model(xt, t, ctx, pooled), eps - x0)


def encoder_masks(b: int, cfg: TeacherConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.rand(b, 3, generator=gen)
    uncond = u[:, 0] < cfg.p_uncond
    return ~uncond & (u[:, 1] >= cfg.p_drop_light), ~uncond & (u[:, 2] >= cfg.p_drop_minilm)


def minilm_cache(captions: list[str], out: Path, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM is frozen, so encode each training caption once and keep it on disk."""
    path = out / f"minilm_cache_{max_tokens}.safetensors"
    # hashlib, not hash(): str hashes are salted per process and ranks must agree.
    key = str(int.from_bytes(hashlib.sha256("\n".join(captions).encode()).digest()[:4], "big"))
    if path.exists():
        d = load_file(path)
        if d["key"].item() == int(key) and d["h"].shape[0] == len(captions):
            return d["h"].float(), d["p"].float()
    enc = MiniLMEncoder(max_tokens=max_tokens)
    hs, ps = [], []
    for i in tqdm(range(0, len(captions), 256), desc="encode captions", leave=False):
        h, p = enc(captions[i: i + 256])
        hs.append(h.half()), ps.append(p.half())
    h, p = torch.cat(hs), torch.cat(ps)
    save_file({"h": h, "p": p, "key": torch.tensor(int(key))}, path)
    return h.float(), p.float()


def train_teacher(cfg: TeacherConfig, resume: bool = False, max_steps: int | None = None) -> Path:
    d = init_dist()
    # A bad list name fails here, before the run folder, model and caption cache are made.
    keep = load_concept_list(cfg.concepts) if cfg.concepts else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(Path(cfg.data), "train")
    if cfg.init_from:  # on --resume the checkpoint then overwrites these weights
        from ..models.flow_model import load_model
        model = load_model(Path(cfg.init_from)).requires_grad_(True).train()
        mcfg = model.cfg
    else:
        mcfg = ModelConfig.from_dict({**cfg.model, "vocab": WordTokenizer.build(corpus.captions).vocab})
        model = FlowModel(mcfg)
    tok = WordTokenizer(mcfg.vocab)
    cond = TextConditioner(tok, model.light, None, mcfg.minilm_max_tokens)
    light_ids = cond.light_ids(corpus.captions)
    if d.main:
        mini_h, mini_p = minilm_cache(corpus.captions, out, mcfg.minilm_max_tokens)
    barrier(d)
    if not d.main:
        mini_h, mini_p = minilm_cache(corpus.captions, out, mcfg.minilm_max_tokens)

    singles = torch.tensor([i for i, r in enumerate(corpus.rows) if r["kind"] == "single"
                            and (keep is None or r["concepts"][0] in keep)], dtype=torch.long)
    if keep is not None and len(singles) == 0:
        raise FlowflashError(f"concept list {cfg.concepts!r} matches no single emoji in {cfg.data}")
    scenes = torch.tensor([i for i, r in enumerate(corpus.rows) if r["kind"] != "single"], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)
    ckpt = out / "checkpoint"
    step = 0
    if resume:
        step = load_checkpoint(ckpt, {"model": model}, {"model": opt}, {"model": ema}, {"data": gen})["step"]
    ddp = model
    if d.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    with open(out / "config.json", "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)

    local_b = cfg.batch_size // d.world
    end = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    bar = tqdm(total=cfg.steps, initial=step, disable=not d.main, desc="teacher", dynamic_ncols=True)
    t0, seen = time.time(), 0
    log = open(out / "log.jsonl", "a") if d.main else None
    with GracefulStop(d.world == 1) as stop:
        while step < end and not stop.requested:
            idx = draw_rows(local_b, singles, scenes, cfg.p_single, gen)
            x0 = to_unit(corpus.images[idx])
            t = sample_t(local_b, cfg, mcfg.shift, gen)
            eps = torch.randn(x0.shape, generator=gen)
            use_l, use_m = encoder_masks(local_b, cfg, gen)
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg, step)
            ctx, pooled = cond.combine(light_ids[idx], mini_h[idx], mini_p[idx], use_l, use_m)
            loss = flow_matching_loss(ddp, x0, t, eps, ctx, pooled)
            check_finite({"flow": loss}, step, ckpt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model, step)
            step += 1
            seen += cfg.batch_size
            lv = all_reduce_mean(loss.detach(), d).item()
            if d.main:
                rate = seen / (time.time() - t0)
                bar.set_postfix(loss=f"{lv:.4f}", img_s=f"{rate:.1f}")
                bar.update(1)
                if step % cfg.log_every == 0:
                    log.write(json.dumps({"step": step, "loss": lv, "grad_norm": float(gnorm), "img_s": rate,
                                          "time": time.time()}) + "\n")
                    log.flush()
            if step % cfg.ckpt_every == 0 or step == end or stop.requested:
                if d.main:
                    save_checkpoint(ckpt, {"model": model}, {"model": opt}, {"model": ema}, {"data": gen}, {"step": step})
                barrier(d)
            if d.main and (step % cfg.sample_every == 0 or step == cfg.steps):
                export(model, ema, out / "ema_model")
                sample_grid(out / "ema_model", cfg.sample_prompts, out / f"samples/step{step:06d}.png")
    bar.close()
    if d.main:
        export(model, ema, out / "ema_model")
    return out / "ema_model"


def export(model: FlowModel, ema: EMA, folder: Path):
    """Write the EMA weights as a loadable fp16 model folder."""
    snap = FlowModel(model.cfg)
    ema.copy_to(snap)
    save_model(snap, folder)
