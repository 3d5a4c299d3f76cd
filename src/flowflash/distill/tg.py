"""`tg`: trajectory guidance (progressive regression). Each student step regresses onto where the
teacher's CFG ODE, integrated finely over the same interval, lands. SD3.5-Flash's warm start."""
from __future__ import annotations

import torch

from .base import Batch, Method, full_t, velocity
from .losses import trajectory_regression


class TrajectoryGuidance(Method):
    name = "tg"

    def __init__(self, cfg, teacher, student=None):
        super().__init__(cfg, teacher, student)
        self.optimizers["student"] = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        self.bank: torch.Tensor | None = None  # (pool, n + 1, C, H, W) teacher states, filled on first use
        self.banked: torch.Tensor | None = None  # which pool entries are filled
        self.teacher_rows = 0  # rows the teacher integrated (tests: the pool is computed once)

    def teacher_states(self, b) -> list[torch.Tensor]:
        """The teacher's ODE states at every student time, from the batch's noise (memoised per pool key)."""
        if b.key is None:
            return self.integrate(b)
        if self.bank is None:
            n = self.cfg.tg_pool
            self.bank = torch.zeros(n, len(self.schedule), *b.noise.shape[1:])
            self.banked = torch.zeros(n, dtype=torch.bool)
        missing = [k for k in b.key.unique().tolist() if not self.banked[k]]
        if missing:
            rows = torch.tensor([int((b.key == k).nonzero()[0]) for k in missing])  # once per key
            sub = Batch(b.ids[rows], b.mini_h[rows], b.mini_p[rows], b.noise[rows])
            self.bank[missing] = torch.stack(self.integrate(sub), 1)
            self.banked[missing] = True
        return list(self.bank[b.key].unbind(1))

    @torch.no_grad()
    def integrate(self, b) -> list[torch.Tensor]:
        s, k = self.schedule, self.cfg.tg_teacher_steps
        self.teacher_rows += b.noise.shape[0]
        x, states = b.noise, [b.noise]
        for i in range(len(s) - 1):
            for j in range(k):
                t0 = s[i] + (s[i + 1] - s[i]) * j / k
                t1 = s[i] + (s[i + 1] - s[i]) * (j + 1) / k
                x = x + (t1 - t0) * velocity(self.teacher, x, full_t(x, t0), b, self.cfg.guidance)
            states.append(x)
        return states

    def train_step(self, batch, step):
        states = self.teacher_states(batch)
        i = self.pick_step()
        s = self.schedule
        x = states[i]
        pred = x + (s[i + 1] - s[i]) * velocity(self.student, x, full_t(x, s[i]), batch)
        loss = trajectory_regression(pred, states[i + 1])
        self._step("student", loss)
        return {"tg": loss.detach()}
