"""Distribution matching on flows, the engine of `dmd2` and `flash` (which are presets of it).

Generator step: at a student step i, the student's x0 estimate gets the DMD2 direction
x0_fake - x0_real (real = teacher with CFG, fake = the critic), normalised per sample. Where that is
evaluated is the switch `timestep_sharing`:
  off (DMD2): re-noise x0_hat to a random t with fresh noise, x_t = (1 - t) x0_hat + t eps;
  on (SD3.5-Flash): evaluate at the student's own trajectory: time t_i of its schedule and the state
      x_{t_i} its own Euler steps reached from the noise; no fresh noise, no other times.
In both cases the direction is applied to the student's output x0_hat (the generator output, as in
DMD2). (Inferred: the paper's text was not available; an in-interval variant, x_{t'} = x_{t_i} +
(t' - t_i) v for t' in [t_{i+1}, t_i], keeps the same x0_hat and is a one-line change here.)
Critic step: flow matching on the student's final samples (fresh noise: that is how a marginal
score is learned), plus the discriminator heads when the adversarial term is on.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Batch, Method, full_t, step_modules, velocity
from .losses import (distribution_matching, dmd_direction, flow_matching, gan_discriminator, gan_generator,
                     x0_from_v)


class Heads(nn.Module):
    """One small MLP head per tapped critic block, on mean-pooled image-token features."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
                                   for _ in range(n))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([h(f.mean(1)) for h, f in zip(self.heads, feats)], 1)

    @torch.no_grad()
    def maybe_reinit(self, p: float, gen: torch.Generator) -> list[int]:
        """NitroFusion-style: each head is re-initialised with probability p (keeps the critic honest)."""
        hit = [i for i in range(len(self.heads)) if float(torch.rand(1, generator=gen)) < p]
        for i in hit:
            for m in self.heads[i].modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)):
                    m.reset_parameters()
        return hit


class FeatureTap:
    """Collects the image-stream output of chosen transformer blocks during a forward pass."""

    def __init__(self, model, blocks: list[int]):
        self.feats: list[torch.Tensor] = []
        self.handles = [model.transformer.transformer_blocks[i].register_forward_hook(self._hook) for i in blocks]

    def _hook(self, module, inputs, output):
        self.feats.append(output[1])

    def take(self) -> list[torch.Tensor]:
        f, self.feats = self.feats, []
        return f


class DistributionMatching(Method):
    name = "dm"
    trainable = ("student", "critic", "heads")

    def __init__(self, cfg, teacher, student=None, critic=None):
        super().__init__(cfg, teacher, student)
        import copy
        self.critic = (critic if critic is not None else copy.deepcopy(teacher)).train().requires_grad_(True)
        width = teacher.cfg.num_heads * teacher.cfg.head_dim
        self.heads = Heads(width, len(cfg.gan_blocks))
        self.tap = FeatureTap(self.critic, cfg.gan_blocks) if cfg.adversarial else None
        betas = (0.0, 0.99)  # DMD2: no first moment for the two-player updates
        self.optimizers["student"] = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, betas=betas)
        self.optimizers["critic"] = torch.optim.AdamW(list(self.critic.parameters()) + list(self.heads.parameters()),
                                                      lr=cfg.lr_critic, betas=betas)
        self.last_match_t: torch.Tensor | None = None  # for tests and diagnostics
        self.fresh_noise_draws = 0

    # ------------------------------------------------------------------ which step
    def is_student_step(self, step: int) -> bool:
        return step % (self.cfg.critic_ratio + 1) == self.cfg.critic_ratio

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if self.cfg.adversarial and self.is_student_step(step):
            self.heads.maybe_reinit(self.cfg.head_reinit_p, self.gen)
        return self.student_step(batch) if self.is_student_step(step) else self.critic_step(batch)

    # ------------------------------------------------------------------ matching point
    def fresh(self, like: torch.Tensor) -> torch.Tensor:
        self.fresh_noise_draws += 1
        return torch.randn(like.shape, generator=self.gen, dtype=like.dtype)

    def matching_point(self, x_i: torch.Tensor, x0_hat: torch.Tensor, i: int):
        """(x_match, t_match): where the real and fake scores are evaluated (no gradient needed there)."""
        if self.cfg.timestep_sharing:
            t = full_t(x_i, self.schedule[i])
            x = x_i
        else:
            u = torch.rand(x_i.shape[0], generator=self.gen, dtype=x_i.dtype)
            t = self.cfg.t_match_min + u * (1 - 2 * self.cfg.t_match_min)
            tb = t.view(-1, 1, 1, 1)
            self._eps = self.fresh(x0_hat)
            x = (1 - tb) * x0_hat.detach() + tb * self._eps
        self.last_match_t = t.detach()
        return x, t

    def adversarial_point(self, x_i, v, x0_hat, t, i):
        """Where the heads judge the student, with the gradient path kept: its next state along its own
        velocity (timestep sharing), or its re-noised output with the matching noise (DMD2)."""
        if self.cfg.timestep_sharing:
            t_next = self.schedule[i + 1]
            return x_i + (t_next - self.schedule[i]) * v, full_t(x_i, t_next)
        tb = t.view(-1, 1, 1, 1)
        return (1 - tb) * x0_hat + tb * self._eps, t

    # ------------------------------------------------------------------ the two players
    def dm_loss(self, b: Batch):
        """The student's distribution-matching surrogate at a drawn step, and the tensors the adversarial
        term reuses: (loss, (x_i, v, x0_hat, t_match, i))."""
        i = self.pick_step()
        x_i, v, x0_hat = self.student_x0(b, i)
        x, t = self.matching_point(x_i, x0_hat, i)
        with torch.no_grad():
            x0_real = x0_from_v(x, t, velocity(self.teacher, x, t, b, self.cfg.guidance))
            x0_fake = x0_from_v(x, t, velocity(self.critic, x, t, b))
        direction = dmd_direction(x0_hat.detach(), x0_real, x0_fake)
        return distribution_matching(x0_hat, direction), (x_i, v, x0_hat, t, i)

    def student_step(self, b: Batch) -> dict[str, torch.Tensor]:
        dm, (x_i, v, x0_hat, t, i) = self.dm_loss(b)
        losses = {"dm": dm}
        loss = dm
        if self.cfg.adversarial:
            x_adv, t_adv = self.adversarial_point(x_i, v, x0_hat, t, i)
            self.tap.take()  # drop the features of the matching pass above
            self.critic.requires_grad_(False)
            velocity(self.critic, x_adv, t_adv, b)
            losses["gan_g"] = gan_generator(self.heads(self.tap.take()))
            self.critic.requires_grad_(True)
            loss = loss + self.cfg.gan_weight * losses["gan_g"]
        self._step("student", loss)
        return {k: v.detach() for k, v in losses.items()}

    def critic_step(self, b: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x0 = self.rollout(b, len(self.schedule) - 1)
        t = torch.rand(x0.shape[0], generator=self.gen).clamp(self.cfg.t_match_min, 1 - self.cfg.t_match_min)
        eps = torch.randn(x0.shape, generator=self.gen)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps
        if self.tap:
            self.tap.take()
        losses = {"critic": flow_matching(velocity(self.critic, x_t, t, b), eps - x0)}
        loss = losses["critic"]
        if self.cfg.adversarial:
            fake_logits = self.heads(self.tap.take())
            real = b.real if b.real is not None else x0
            xr = (1 - tb) * real + tb * torch.randn(real.shape, generator=self.gen)
            velocity(self.critic, xr, t, b)
            losses["gan_d"] = gan_discriminator(self.heads(self.tap.take()), fake_logits)
            loss = loss + self.cfg.gan_weight * losses["gan_d"]
        step_modules(self.optimizers["critic"], [self.critic, self.heads], loss, self.cfg.grad_clip)  # one optimizer
        return {k: v.detach() for k, v in losses.items()}
