"""`flash`: the SD3.5-Flash recipe's distribution matching, i.e. DMD2 with **timestep sharing**: the real
and fake scores are evaluated on the student's own trajectory (time t_i of its schedule and the state
x_{t_i} its own Euler steps reached from the noise; no fresh noise at the matching point, no other times;
the default normaliser, `dm_norm: renoised`, draws its own noise once, see dmd2.py), and the adversarial
heads judge the student's next state along its own velocity. `timestep_sharing: false` turns the
sharing off (the ablation row: then it is DMD2). The trajectory-guidance warm start is a `tg` run passed
as `init_student`; split-timestep branches are `split: low|high` runs merged with `flowflash merge`.
(Inferred: the paper's text was not available.) `match_point: interval` matches at t' in [t_{i+1}, t_i] on
the student's own line x_{t'} = x_{t_i} + (t' - t_i) v, which keeps the same x0_hat (the ablation's arm C).
"""
from __future__ import annotations

import torch

from ..sampling import add_noise, euler_step
from .base import refuse, set_fields
from .dmd2 import DMD2


class Flash(DMD2):
    name = "flash"

    def timestep_sharing(self, asked: bool | None) -> bool:
        return True if asked is None else bool(asked)

    @classmethod
    def check_config(cls, cfg, loop_fields: set[str]):
        super().check_config(cfg, loop_fields)
        if cfg.timestep_sharing is False:
            refuse(cls, set_fields(cfg, {"match_point"}), " without timestep sharing")

    def matching_point(self, x_i, v, x0_hat, i):
        if not self.sharing:
            return super().matching_point(x_i, v, x0_hat, i)
        t = self.times(i, x_i)
        t_new = t
        if self.cfg.match_point == "interval":
            # a point inside the step's interval, on the student's own line x_t' = x_i + (t' - t_i) v: its x0 along
            # v is x0_hat, and the scores are taken where the student's step passes, not only at its start
            t_next = self.times(i, x_i, 1)
            t_new = t_next + self.rand(x_i.shape[0]).to(t.dtype) * (t - t_next)
        # never below the critic's training range (an SD3 schedule's last step starts at t ~ 0.009): such a point
        # moves up the student's own line to t_min, which keeps its x0_hat
        t_new = t_new.clamp(min=self.t_min)
        self.last_match_t = t_new.detach()
        return euler_step(x_i, v.detach(), t, t_new), t_new

    def adversarial_point(self, x_i, v, x0_hat, t, i):
        if not self.sharing:
            return super().adversarial_point(x_i, v, x0_hat, t, i)
        t_i, t_next = self.times(i, x_i), self.times(i, x_i, 1)
        x = euler_step(x_i, v, t_i, t_next)
        if self.cfg.adversarial_floor:
            # the heads never train at t < t_min (the last step ends at t = 0): such a point is re-noised to t_min
            # (computed for every row and picked with where: no host sync on an accelerator)
            low = t_next < self.t_min
            floor = torch.full_like(t_next, self.t_min)
            noised = add_noise(x, self.randn(*x.shape).to(x.dtype), floor)
            x = torch.where(low.view(-1, *([1] * (x.dim() - 1))), noised, x)
            t_next = torch.where(low, floor, t_next)
        return x, t_next
