"""`dmd2`: distribution matching on flows (DMD2), and the engine `flash` extends.

Student step: at a student step i, the student's x0 estimate gets the DMD2 direction x0_fake - x0_real
(real = the teacher with CFG, fake = the critic), normalised per sample. DMD2 evaluates both scores on
the student's x0 re-noised to a random t with fresh noise; `flash` (flash.py) evaluates them on the
student's own trajectory instead (timestep sharing). The direction is applied to the student's output
x0_hat (the generator output, as in DMD2). Critic step: flow matching on the student's final samples
(fresh noise: that is how a marginal score is learned), plus the discriminator heads when the
adversarial term is on.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import FlowflashError
from ..sampling import add_noise, time_shift, velocity_target, x0_from_v
from ..train.data import Batch
from .base import StepOutput, refuse, set_fields, velocity
from .losses import distribution_matching, dmd_direction, flow_matching, gan_discriminator, gan_generator
from .student import STUDENT_FIELDS, StudentMethod, is_latent

DM_FIELDS = STUDENT_FIELDS | {"lr_critic", "critic_ratio", "timestep_sharing", "t_match_min", "adversarial",
                              "gan_weight", "gan_blocks", "head_reinit_p", "real_images", "init_critic",
                              "critic_warmup", "dm_norm", "match_point", "critic_t", "adversarial_floor"}
DM_NORMS, MATCH_POINTS, CRITIC_TS = ("renoised", "matching", "none"), ("start", "interval"), ("full", "uniform", "teacher")


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


def adversarial_on(cfg, teacher) -> bool:
    """The adversarial term is on unless set off; by default it needs real samples: the emoji corpus always has
    them, an SD3 teacher's run has them when it is given real images (real_images)."""
    if cfg.adversarial is not None:
        return bool(cfg.adversarial)
    return not is_latent(teacher) or cfg.real_images is not None


def gan_blocks(asked: list[int] | None, teacher) -> list[int]:
    """The critic blocks the heads read: as asked, or at about a quarter and five eighths of the depth."""
    n = len(teacher.transformer.transformer_blocks)
    blocks = list(asked) if asked is not None else sorted({n // 4, 5 * n // 8})
    bad = [b for b in blocks if not (isinstance(b, int) and 0 <= b < n)]
    if bad or not blocks:
        raise FlowflashError(f"gan_blocks {blocks} must name blocks 0..{n - 1} of the teacher's {n}")
    return blocks


class DMD2(StudentMethod):
    name = "dmd2"
    uses = DM_FIELDS

    def __init__(self, cfg, teacher, student=None, critic=None):
        super().__init__(cfg, teacher, student)
        self.sharing = self.timestep_sharing(cfg.timestep_sharing)
        self.critic = (critic if critic is not None else copy.deepcopy(teacher)).train().requires_grad_(True)
        self.adversarial = adversarial_on(cfg, teacher)
        self.gan_blocks = blocks = gan_blocks(cfg.gan_blocks, teacher)
        self.heads = Heads(teacher.cfg.num_heads * teacher.cfg.head_dim, len(blocks))
        self.tap = FeatureTap(self.critic, blocks) if self.adversarial else None
        self.networks.update(critic=self.critic, heads=self.heads)
        betas = (0.0, 0.99)  # DMD2: no first moment for the two-player updates
        self.optimizers["student"] = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, betas=betas)
        # one optimizer for the critic and its heads: they are one player
        self.optimizers["critic"] = torch.optim.AdamW(list(self.critic.parameters()) + list(self.heads.parameters()),
                                                      lr=cfg.lr_critic, betas=betas)
        self.last_match_t: torch.Tensor | None = None  # for tests and diagnostics
        self.fresh_noise_draws = 0  # fresh noise of the matching point (not the normaliser's)
        # lowest time the critic trains at and the scores are matched at: a model that clamps t (x-prediction)
        # is not asked below its clamp
        floor = getattr(teacher.cfg, "t_min", 0.02)
        self.t_min = cfg.t_match_min if cfg.t_match_min is not None else floor

    @classmethod
    def check_config(cls, cfg, loop_fields: set[str]):
        super().check_config(cfg, loop_fields)
        if cfg.adversarial is False:
            refuse(cls, set_fields(cfg, {"gan_weight", "gan_blocks", "head_reinit_p", "real_images",
                                         "adversarial_floor"}), " with adversarial: false")
        for name, value, known in (("dm_norm", cfg.dm_norm, DM_NORMS), ("match_point", cfg.match_point, MATCH_POINTS),
                                   ("critic_t", cfg.critic_t, CRITIC_TS)):
            if value not in known:
                raise FlowflashError(f"{name} must be one of {', '.join(known)}, got {value!r}")
        if cls is DMD2:  # these read the student's own trajectory: flash's
            refuse(cls, set_fields(cfg, {"match_point", "adversarial_floor"}), " (no timestep sharing)")
        if cfg.critic_warmup < 0:
            raise FlowflashError(f"critic_warmup must be >= 0, got {cfg.critic_warmup}")
        if cfg.t_match_min is not None and not 0 <= cfg.t_match_min < 0.5:
            raise FlowflashError(f"t_match_min must lie in [0, 0.5), got {cfg.t_match_min}")

    def timestep_sharing(self, asked: bool | None) -> bool:
        if asked:
            raise FlowflashError("dmd2 matches on re-noised end-points; timestep sharing is method flash")
        return False

    # ------------------------------------------------------------------ which step
    def is_student_step(self, step: int) -> bool:
        """critic_warmup critic-only iterations, then critic_ratio critic updates per student update."""
        k = step - self.cfg.critic_warmup
        return k >= 0 and k % (self.cfg.critic_ratio + 1) == self.cfg.critic_ratio

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        if not self.is_student_step(step):
            return self.critic_step(batch)
        if self.adversarial:
            self.heads.maybe_reinit(self.cfg.head_reinit_p, self.gen)
        return self.student_step(batch)

    # ------------------------------------------------------------------ matching point
    def fresh(self, like: torch.Tensor) -> torch.Tensor:
        self.fresh_noise_draws += 1
        return self.randn(*like.shape).to(like.dtype)

    def matching_point(self, x_i: torch.Tensor, v: torch.Tensor, x0_hat: torch.Tensor, i: torch.Tensor):
        """(x_match, t_match): the student's x0 re-noised to a random t with fresh noise (no gradient there)."""
        u = self.rand(x_i.shape[0]).to(x_i.dtype)
        t = self.t_min + u * (1 - 2 * self.t_min)
        self._eps = self.fresh(x0_hat)
        self.last_match_t = t.detach()
        return add_noise(x0_hat.detach(), self._eps, t), t

    def critic_times(self, n: int) -> torch.Tensor:
        """Times the critic (and its heads) train at. `full`: uniform on [t_min, 1], every time any arm asks it at
        (re-noising's uniform t, the student's t_i including the first step's t = 1, in-interval points, the
        adversarial floor). `uniform` (the old arm): clamped to [t_min, 1 - t_min]. `teacher`: the teacher's
        training density (logit-normal under its shift), which leaves low t nearly untrained."""
        if self.cfg.critic_t == "full":
            return self.t_min + self.rand(n) * (1 - self.t_min)
        if self.cfg.critic_t == "uniform":
            t = self.rand(n)
        else:
            t = time_shift(torch.sigmoid(self.randn(n)), self.teacher.cfg.sampling.shift)
        return t.clamp(self.t_min, 1 - self.t_min)

    def adversarial_point(self, x_i, v, x0_hat, t, i):
        """Where the heads judge the student, gradient path kept: its output re-noised with the matching noise."""
        return add_noise(x0_hat, self._eps, t), t

    # ------------------------------------------------------------------ the two players
    def dm_loss(self, b: Batch):
        """The student's distribution-matching surrogate at a drawn step, and the tensors the adversarial
        term reuses: (loss, (x_i, v, x0_hat, t_match, i))."""
        i = self.pick_steps(b.noise.shape[0])
        x_i, v, x0_hat = self.student_x0(b, i)
        x, t = self.matching_point(x_i, v, x0_hat, i)
        with torch.no_grad():
            x0_real = x0_from_v(x, t, velocity(self.teacher, x, t, b.for_teacher(), self.cfg.guidance))
            x0_fake = x0_from_v(x, t, velocity(self.critic, x, t, b))
            norm_real = None
            if self.cfg.dm_norm == "renoised" and self.sharing:
                # Under sharing x0_hat and x0_real come from the same point, so |x0_hat - x0_real| is t |v_s -
                # v_real| and the normalised step stays order 1 however close the student is; DMD2's normaliser
                # is taken at a fresh re-noising of x0_hat instead (its own noise, the same t).
                xr = add_noise(x0_hat.detach(), self.randn(*x0_hat.shape).to(x0_hat.dtype), t)
                norm_real = x0_from_v(xr, t, velocity(self.teacher, xr, t, b.for_teacher(), self.cfg.guidance))
        direction = dmd_direction(x0_hat.detach(), x0_real, x0_fake, norm_real=norm_real,
                                  normalise=self.cfg.dm_norm != "none")
        return distribution_matching(x0_hat, direction), (x_i, v, x0_hat, t, i)

    def student_step(self, b: Batch) -> StepOutput:
        dm, (x_i, v, x0_hat, t, i) = self.dm_loss(b)
        logs = {"dm": dm.detach()}
        loss = dm
        if self.adversarial:
            x_adv, t_adv = self.adversarial_point(x_i, v, x0_hat, t, i)
            self.tap.take()  # drop the features of the matching pass above
            # the critic is a fixed judge here: no graph through its weights. It stays frozen until after backward
            # (after_backward), so that a checkpointed block recomputes the same graph it saved.
            self.critic.requires_grad_(False)
            velocity(self.critic, x_adv, t_adv, b)
            gan_g = gan_generator(self.heads(self.tap.take()))
            logs["gan_g"] = gan_g.detach()
            loss = loss + self.cfg.gan_weight * gan_g
        return StepOutput(loss, ("student",), logs)

    def after_backward(self):
        self.critic.requires_grad_(True)

    def critic_step(self, b: Batch) -> StepOutput:
        self.critic.requires_grad_(True)  # also when the last student step's backward never ran (diagnostics)
        with torch.no_grad():
            x0 = self.final_samples(b)
        t = self.critic_times(x0.shape[0]).to(x0.dtype)
        eps = self.randn(*x0.shape)
        if self.tap:
            self.tap.take()
        critic = flow_matching(velocity(self.critic, add_noise(x0, eps, t), t, b), velocity_target(x0, eps))
        logs, loss = {"critic": critic.detach()}, critic
        if self.adversarial:
            fake_logits = self.heads(self.tap.take())
            real = b.real if b.real is not None else x0
            velocity(self.critic, add_noise(real, self.randn(*real.shape), t), t, b)
            gan_d = gan_discriminator(self.heads(self.tap.take()), fake_logits)
            logs["gan_d"] = gan_d.detach()
            loss = loss + self.cfg.gan_weight * gan_d
        return StepOutput(loss, ("critic",), logs)
