"""The one distillation trainer: data, EMA, checkpoints, logging, samples and DDP, for every method."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.dataset import Corpus, load_corpus, to_unit
from ..errors import FlowflashError
from ..models.flow_model import FlowModel, load_model, save_model
from ..models.text import TextConditioner, WordTokenizer
from ..runtime.pipeline import resolve_model
from ..train.common import (EMA, GracefulStop, all_reduce_mean, barrier, check_finite, init_dist, load_checkpoint,
                            save_checkpoint)
from ..train.grid import sample_grid
from ..train.teacher import minilm_cache
from . import METHODS
from .base import Batch, DistillConfig, Method


def student_config(teacher: FlowModel, method, cfg: DistillConfig, name: str):
    guidance = teacher.cfg.default_guidance if cfg.method == "naive" else 1.0  # students are CFG-free
    return dataclasses.replace(teacher.cfg, kind="student", schedule=method.schedule, name=name,
                               default_steps=len(method.schedule) - 1, default_guidance=guidance)


def export_student(weights: FlowModel | EMA, teacher: FlowModel, method, cfg: DistillConfig, folder: Path):
    snap = FlowModel(student_config(teacher, method, cfg, Path(cfg.out).name))
    if isinstance(weights, EMA):
        weights.copy_to(snap)
    else:
        snap.load_state_dict(weights.state_dict())
    save_model(snap, folder)


@dataclass
class Setup:
    teacher: FlowModel
    method: Method
    corpus: Corpus | None  # None for `naive`, which trains nothing
    ids: torch.Tensor | None
    mini_h: torch.Tensor | None
    mini_p: torch.Tensor | None
    pool_idx: torch.Tensor | None = None  # tg_pool: the fixed captions ...
    pool_noise: torch.Tensor | None = None  # ... and noises, drawn once from the seed

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Batch:
        c, s = self.teacher.cfg.channels, self.teacher.cfg.image_size
        return Batch(self.ids[idx], self.mini_h[idx], self.mini_p[idx],
                     torch.randn(len(idx), c, s, s, generator=gen), to_unit(self.corpus.images[idx]))

    def draw(self, n: int, gen: torch.Generator) -> Batch:
        """A training batch: fresh captions and noise, or n entries of the fixed pool."""
        if self.pool_idx is None:
            return self.batch(torch.randint(len(self.corpus), (n,), generator=gen), gen)
        key = torch.randint(len(self.pool_idx), (n,), generator=gen)
        idx = self.pool_idx[key]
        return Batch(self.ids[idx], self.mini_h[idx], self.mini_p[idx], self.pool_noise[key],
                     to_unit(self.corpus.images[idx]), key)


def setup(cfg: DistillConfig, d) -> Setup:
    """Roles, method and the encoded training captions: what training and diagnostics both need."""
    if cfg.method not in METHODS:
        raise FlowflashError(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    out = Path(cfg.out)
    teacher_dir = resolve_model(cfg.teacher)  # a wrong teacher fails before the run folder exists
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher = load_model(teacher_dir)
    student = None
    if cfg.init_student:
        student = load_model(Path(cfg.init_student))
        if student.cfg.vocab != teacher.cfg.vocab or student.cfg.transformer_kwargs() != teacher.cfg.transformer_kwargs():
            raise FlowflashError(f"init_student {cfg.init_student} does not match the teacher's architecture/vocabulary")
    method = METHODS[cfg.method](cfg, teacher, student)
    if cfg.method == "naive":
        return Setup(teacher, method, None, None, None, None)
    corpus = load_corpus(Path(cfg.data), "train")
    if corpus.images.shape[-1] != teacher.cfg.image_size:
        raise FlowflashError(f"corpus images are {corpus.images.shape[-1]}px but the teacher makes "
                             f"{teacher.cfg.image_size}px: teacher and data do not match")
    cond = TextConditioner(WordTokenizer(teacher.cfg.vocab), teacher.light, None, teacher.cfg.minilm_max_tokens)
    ids = cond.light_ids(corpus.captions)
    if d.main:
        mini_h, mini_p = minilm_cache(corpus.captions, out, teacher.cfg.minilm_max_tokens)
    barrier(d)
    if not d.main:
        mini_h, mini_p = minilm_cache(corpus.captions, out, teacher.cfg.minilm_max_tokens)
    su = Setup(teacher, method, corpus, ids, mini_h, mini_p)
    if cfg.tg_pool:
        if cfg.method != "tg":
            raise FlowflashError(f"tg_pool is a trajectory-guidance option; method {cfg.method!r} draws fresh noise")
        g = torch.Generator().manual_seed(cfg.seed * 1000 + 5)  # the same pool on every rank and after resume
        c, s = teacher.cfg.channels, teacher.cfg.image_size
        su.pool_idx = torch.randint(len(corpus), (cfg.tg_pool,), generator=g)
        su.pool_noise = torch.randn(cfg.tg_pool, c, s, s, generator=g)
    return su


def measure_variance(cfg: DistillConfig, draws: int = 16, batch_size: int = 8, seed: int = 0,
                     from_checkpoint: bool = False) -> dict:
    """Variance of the DM gradient on one fixed batch, timestep sharing vs re-noising, for the roles of
    `cfg` (its student init and a critic from the teacher, or the run's last checkpoint)."""
    from .diagnostics import compare_sharing
    from .dmd import DistributionMatching

    su = setup(cfg, init_dist())
    if not isinstance(su.method, DistributionMatching):
        raise FlowflashError(f"method {cfg.method!r} has no distribution-matching gradient; use flash or dmd2")
    if from_checkpoint:
        ema = EMA(su.method.student, cfg.ema)
        load_checkpoint(Path(cfg.out) / "checkpoint", su.method.modules(), {}, {"student": ema}, {})
    gen = torch.Generator().manual_seed(seed)
    b = su.batch(torch.randint(len(su.corpus), (batch_size,), generator=gen), gen)
    res = compare_sharing(su.method, b, draws, seed)
    res["ratio_renoise_over_sharing"] = (res["renoise"]["relative_variance"]
                                         / max(res["sharing"]["relative_variance"], 1e-30))
    res.update(batch_size=batch_size, seed=seed, config=dataclasses.asdict(cfg))
    return res


def distill(cfg: DistillConfig, resume: bool = False, max_steps: int | None = None) -> Path:
    d = init_dist()
    out = Path(cfg.out)
    su = setup(cfg, d)
    teacher, method = su.teacher, su.method
    if d.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if cfg.method == "naive":
        if d.main:
            export_student(teacher, teacher, method, cfg, out / "student")
        return out / "student"

    ema = EMA(method.student, cfg.ema, warmup=cfg.split is None)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)
    method.gen.manual_seed(cfg.seed * 1000 + 17 + d.rank)
    ckpt = out / "checkpoint"
    modules = method.modules()
    gens = {"data": gen, "method": method.gen}
    step = 0
    if resume:
        step = load_checkpoint(ckpt, modules, method.optimizers, {"student": ema}, gens)["step"]
    local_b = cfg.batch_size // d.world
    end = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    bar = tqdm(total=cfg.steps, initial=step, disable=not d.main, desc=f"distill {cfg.method}", dynamic_ncols=True)
    log = open(out / "log.jsonl", "a") if d.main else None
    with GracefulStop(d.world == 1) as stop:
        while step < end and not stop.requested:
            batch = su.draw(local_b, gen)
            losses = method.train_step(batch, step)
            check_finite(losses, step, ckpt)
            ema.update(method.student, step)
            step += 1
            vals = {k: all_reduce_mean(v, d).item() for k, v in losses.items()}
            if d.main:
                bar.set_postfix({k: f"{v:.4f}" for k, v in vals.items()})
                bar.update(1)
                if step % cfg.log_every == 0:
                    log.write(json.dumps({"step": step, **vals, "time": time.time()}) + "\n")
                    log.flush()
            if step % cfg.ckpt_every == 0 or step == end or stop.requested:
                if d.main:
                    save_checkpoint(ckpt, modules, method.optimizers, {"student": ema}, gens, {"step": step})
                barrier(d)
            if d.main and (step % cfg.sample_every == 0 or step == cfg.steps):
                export_student(ema, teacher, method, cfg, out / "student")
                sample_grid(out / "student", ["grinning face, twemoji style", "red apple, fluent flat style"],
                            out / f"samples/step{step:06d}.png", steps=None, guidance=None)
    bar.close()
    if d.main:
        export_student(ema, teacher, method, cfg, out / "student")
    return out / "student"
