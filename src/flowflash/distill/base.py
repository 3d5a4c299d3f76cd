"""The contract every distillation method follows, and what the methods share.

A method owns its roles (frozen teacher, trainable student, and optionally a fake-score critic and
discriminator heads) and their optimizers, and implements `train_step(batch, step) -> losses`; it
decides which optimizer steps on which step. EMA, clipping, checkpoints, logging, DDP and the loop
live in the trainer, shared by all methods.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from ..models.flow_model import FlowModel
from ..models.text import combine
from .losses import x0_from_v
from .schedule import split_range, steps_in_range, student_schedule


@dataclass
class DistillConfig:
    teacher: str = "teacher"  # shipped name or model folder
    data: str = "data/emoji64"  # corpus: captions (all methods) and real images (adversarial term)
    out: str = "runs/distill"
    method: str = "flash"
    init_student: str | None = None  # a model folder to start the student from (e.g. the TG stage)
    student_steps: int = 4
    student_shift: float | None = None  # default: the teacher's shift
    schedule: list[float] | None = None  # explicit student times, 1 -> 0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-5
    lr_critic: float = 4e-5
    guidance: float = 4.0  # the real score: teacher with CFG
    critic_ratio: int = 5  # critic updates per student update (DMD2: 5)
    timestep_sharing: bool = True
    t_match_min: float = 0.02
    adversarial: bool = True
    gan_weight: float = 0.05
    gan_blocks: list = field(default_factory=lambda: [2, 5])  # critic blocks whose features the heads read
    head_reinit_p: float = 0.01
    split: str | None = None  # split-timestep fine-tuning branch: low (t <= split_at) or high (t > split_at)
    split_at: float = 0.5  # the boundary; a 2-step schedule (1, 0.6) needs one between its two times
    tg_teacher_steps: int = 4  # teacher Euler steps per student interval for trajectory guidance
    # tg only: a fixed pool of N (caption, noise) pairs whose teacher trajectories are computed once and
    # reused every epoch (the teacher's CFG ODE is ~20x the cost of a student step); 0 = fresh each step
    tg_pool: int = 0
    ema: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    sample_every: int = 200
    ckpt_every: int = 50


@dataclass
class Batch:
    ids: Tensor  # light-encoder token ids (B, L)
    mini_h: Tensor  # MiniLM token states (B, Lm, 384)
    mini_p: Tensor  # MiniLM pooled (B, 384)
    noise: Tensor  # (B, C, H, W)
    real: Tensor | None = None  # real images in [-1, 1], for the adversarial term
    key: Tensor | None = None  # positions in the trainer's fixed pool (tg_pool), else None


def condition(model: FlowModel, b: Batch, on: bool) -> tuple[Tensor, Tensor]:
    """Context of `model`'s own light encoder (each role has its copy); on=False is the CFG null."""
    m = torch.full((b.ids.shape[0],), on, dtype=torch.bool)
    return combine(model.light, b.ids, b.mini_h, b.mini_p, m, m)


def velocity(model: FlowModel, x: Tensor, t: Tensor, b: Batch, guidance: float = 1.0) -> Tensor:
    """v(x, t | text), with classifier-free guidance when guidance != 1 (one batched call)."""
    ctx, pooled = condition(model, b, True)
    if guidance == 1.0:
        return model(x, t, ctx, pooled)
    uctx, upooled = condition(model, b, False)
    vc, vu = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, uctx]), torch.cat([pooled, upooled])).chunk(2)
    return vu + guidance * (vc - vu)


def full_t(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype)


class Method:
    """Base: holds the roles; subclasses define optimizers and train_step."""

    name = "base"
    trainable: tuple[str, ...] = ("student",)

    def __init__(self, cfg: DistillConfig, teacher: FlowModel, student: FlowModel | None = None):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = (student if student is not None else copy.deepcopy(teacher)).train().requires_grad_(True)
        shift = cfg.student_shift if cfg.student_shift is not None else teacher.cfg.shift
        self.schedule = student_schedule(cfg.student_steps, shift, cfg.schedule)
        lo, hi = split_range(cfg.split, cfg.split_at)
        self.train_steps = steps_in_range(self.schedule, lo, hi)
        self.gen = torch.Generator().manual_seed(cfg.seed + 17)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.trainable}

    def pick_step(self) -> int:
        """A student step index i (restricted to the split's range)."""
        j = int(torch.randint(len(self.train_steps), (1,), generator=self.gen))
        return self.train_steps[j]

    @torch.no_grad()
    def rollout(self, b: Batch, upto: int) -> Tensor:
        """The student's own state at t_upto, reached from the noise by its own Euler steps."""
        x, s = b.noise, self.schedule
        for j in range(upto):
            x = x + (s[j + 1] - s[j]) * velocity(self.student, x, full_t(x, s[j]), b)
        return x

    def student_x0(self, b: Batch, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(x_{t_i}, v_student with grad, x0_hat with grad) at student step i."""
        x = self.rollout(b, i)
        t = full_t(x, self.schedule[i])
        v = velocity(self.student, x, t, b)
        return x, v, x0_from_v(x, t, v)

    def train_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _step(self, name: str, loss: Tensor):
        step_modules(self.optimizers[name], [getattr(self, name)], loss, self.cfg.grad_clip)


def step_modules(opt: torch.optim.Optimizer, modules: list[nn.Module], loss: Tensor, clip: float):
    """Backward, average gradients across ranks, clip, step: shared by every method and role."""
    from ..train.common import sync_grads

    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        sync_grads(m)
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
