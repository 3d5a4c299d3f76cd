"""`tg`: trajectory guidance (progressive regression). Each student step regresses onto where the
teacher's CFG ODE, integrated finely over the same interval, lands. SD3.5-Flash's warm start."""
from __future__ import annotations

import torch

from ..sampling import euler_step, sample, subdivide
from ..train.data import Batch
from .base import StepOutput, velocity
from .losses import trajectory_regression
from .student import STUDENT_FIELDS, StudentMethod


class TrajectoryGuidance(StudentMethod):
    name = "tg"
    uses = (STUDENT_FIELDS - {"also_steps", "also_times"}) | {"tg_teacher_steps", "tg_pool"}  # its trajectory bank is one schedule's

    def __init__(self, cfg, teacher, student=None):
        super().__init__(cfg, teacher, student)
        self.optimizers["student"] = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        self.bank: torch.Tensor | None = None  # (pool, n + 1, C, H, W) teacher states, filled on first use
        self.banked: torch.Tensor | None = None  # which pool entries are filled
        self.pool_full = False  # then a step reads nothing back from the device
        self.teacher_rows = 0  # rows the teacher integrated (tests: the pool is computed once)

    def teacher_states(self, b: Batch) -> list[torch.Tensor]:
        """The teacher's ODE states at every student time, from the batch's noise (memoised per pool key)."""
        if b.key is None:
            return self.integrate(b)
        if self.pool_full:
            return list(self.bank[b.key].unbind(1))
        if self.bank is None:
            self.bank = torch.zeros(self.cfg.tg_pool, len(self.schedule), *b.noise.shape[1:], device=b.noise.device)
            self.banked = torch.zeros(self.cfg.tg_pool, dtype=torch.bool)
        keys = b.key.tolist()  # one read from the device, not one per key
        first = {}
        for row, k in enumerate(keys):
            first.setdefault(k, row)
        missing = sorted(k for k in first if not self.banked[k])  # in key order, as before
        if missing:
            rows = torch.tensor([first[k] for k in missing])  # once per key
            self.bank[missing] = torch.stack(self.integrate(b.rows(rows)), 1)
            self.banked[missing] = True
            self.pool_full = bool(self.banked.all())
        return list(self.bank[b.key].unbind(1))

    @torch.no_grad()
    def integrate(self, b: Batch) -> list[torch.Tensor]:
        """The teacher's CFG ODE from the noise, tg_teacher_steps Euler steps per student interval."""
        s = self.schedule
        self.teacher_rows += b.noise.shape[0]
        bt = b.for_teacher()
        teacher = lambda x, t: velocity(self.teacher, x, t, bt, self.cfg.guidance)
        states = [b.noise]
        for i in range(len(s) - 1):
            states.append(sample(teacher, states[-1], subdivide(s[i], s[i + 1], self.cfg.tg_teacher_steps)))
        return states

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        states = torch.stack(self.teacher_states(batch))  # (n + 1, B, ...)
        i = self.pick_steps(batch.noise.shape[0])
        rows = torch.arange(len(i), device=i.device)
        x, target = states[i, rows], states[i + 1, rows]
        t, t_next = self.times(i, x), self.times(i, x, 1)
        pred = euler_step(x, velocity(self.student, x, t, batch), t, t_next)
        loss = trajectory_regression(pred, target)
        return StepOutput(loss, ("student",), {"tg": loss.detach()})
