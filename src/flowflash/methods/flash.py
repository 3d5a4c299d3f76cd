"""`flash`: the SD3.5-Flash recipe's distribution matching, i.e. DMD2 with **timestep sharing**: the real
and fake scores are evaluated on the student's own trajectory (time t_i of its schedule and the state
x_{t_i} its own Euler steps reached from the noise; no fresh noise, no other times), and the adversarial
heads judge the student's next state along its own velocity. `timestep_sharing: false` turns the
sharing off (the ablation row: then it is DMD2). The trajectory-guidance warm start is a `tg` run passed
as `init_student`; split-timestep branches are `split: low|high` runs merged with `flowflash merge`.
(Inferred: the paper's text was not available; an in-interval variant, x_{t'} = x_{t_i} + (t' - t_i) v
for t' in [t_{i+1}, t_i], keeps the same x0_hat and is a one-line change in `matching_point`.)
"""
from __future__ import annotations

from ..sampling import euler_step
from .base import full_t
from .dmd2 import DMD2


class Flash(DMD2):
    name = "flash"

    def timestep_sharing(self, asked: bool | None) -> bool:
        return True if asked is None else bool(asked)

    def matching_point(self, x_i, x0_hat, i):
        if not self.sharing:
            return super().matching_point(x_i, x0_hat, i)
        t = full_t(x_i, self.schedule[i])
        self.last_match_t = t.detach()
        return x_i, t

    def adversarial_point(self, x_i, v, x0_hat, t, i):
        if not self.sharing:
            return super().adversarial_point(x_i, v, x0_hat, t, i)
        t_next = self.schedule[i + 1]
        return euler_step(x_i, v, self.schedule[i], t_next), full_t(x_i, t_next)
