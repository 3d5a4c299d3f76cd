"""`rf`: rectified-flow training of a teacher (SD3's recipe): logit-normal timesteps with the model's
shift, 10% caption dropout for CFG, and independent dropout of each text encoder so either can be
dropped at inference."""
from __future__ import annotations


import torch
from torch import Tensor

from ..models.flow_model import FlowModel
from ..sampling import add_noise, logit_normal_t, time_shift, velocity_target
from ..train.common import load_cast
from ..train.data import Batch
from .base import Method, StepOutput, condition
from .losses import flow_matching


def flow_matching_loss(model: FlowModel, x0: Tensor, t: Tensor, noise: Tensor, ctx: Tensor, pooled: Tensor) -> Tensor:
    return flow_matching(model(add_noise(x0, noise, t), t, ctx, pooled), velocity_target(x0, noise))


class RectifiedFlow(Method):
    name = "rf"
    uses = frozenset({"model", "p_single", "concepts", "weight_decay", "logit_mean", "logit_std", "p_uncond",
                      "p_drop_light", "p_drop_minilm", "init_from", "sample_prompts", "p_phrasing",
                      "extend_vocab"})
    ema_network = "model"
    export_dir = "ema_model"

    def __init__(self, cfg, model: FlowModel):
        super().__init__(cfg, cfg.seed + 17)
        self.model = model.train().requires_grad_(True)
        self.networks = {"model": self.model}
        self.optimizers = {"model": torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                                      weight_decay=cfg.weight_decay)}

    def encoder_masks(self, b: int) -> tuple[Tensor, Tensor]:
        """Per sample: is the light encoder / MiniLM kept? Both off is the CFG null."""
        u = self.rand(b, 3)
        uncond = u[:, 0] < self.cfg.p_uncond
        return ~uncond & (u[:, 1] >= self.cfg.p_drop_light), ~uncond & (u[:, 2] >= self.cfg.p_drop_minilm)

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        b = batch.real.shape[0]
        t = time_shift(logit_normal_t(b, self.cfg.logit_mean, self.cfg.logit_std, self.gen),
                       self.model.cfg.sampling.shift).to(self.device)
        use_light, use_minilm = self.encoder_masks(b)
        ctx, pooled = condition(self.model, batch, use_light, use_minilm)
        loss = flow_matching_loss(self.model, batch.real, t, batch.noise, ctx, pooled)
        return StepOutput(loss, ("model",), {"flow": loss.detach()})

    def export_model(self, weights: dict[str, Tensor]) -> FlowModel:
        return load_cast(FlowModel(self.model.cfg), weights)


