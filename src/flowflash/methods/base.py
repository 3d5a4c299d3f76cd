"""The contract every training method follows (NVlabs FastGen style).

A method owns its networks (trainable roles by name), their optimizers and its own random generator.
`train_step(batch, step)` computes the losses of one iteration and says which optimizer(s) step; it
never calls backward or an optimizer itself. The loop (train/loop.py) owns everything else: backward,
gradient sync across ranks, clipping, optimizer steps, EMA of the exported network (when its optimizer
stepped), checkpoints, resume, the NaN stop, signals, logging and sample grids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import FlowflashError
from ..models.flow_model import FlowModel
from ..sampling import guided_velocity
from ..train.data import Batch


@dataclass
class StepOutput:
    loss: Tensor  # what backward runs on
    step: tuple[str, ...]  # the optimizers that step on this iteration
    logs: dict[str, Tensor] = field(default_factory=dict)  # detached terms, for the log and the NaN check


class Method:
    name: ClassVar[str] = "base"
    # Config fields this method reads beyond the loop's; any other field set away from its default is refused.
    uses: ClassVar[frozenset[str]] = frozenset()
    loop_fields: ClassVar[frozenset[str] | None] = None  # the loop's fields it takes (None: all of them)
    ema_network: ClassVar[str] = "student"  # the network whose EMA is exported
    export_dir: ClassVar[str] = "student"

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)  # on the CPU: draws are then moved, so runs match across devices
        self.device = torch.device("cpu")
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def to(self, device: torch.device | str) -> "Method":
        """Move every network the method holds (frozen ones too). Parameters keep their identity, so the
        optimizers built on them stay valid; call before loading a checkpoint."""
        self.device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(self.device)
        return self

    def share_draws(self, rank: int, world: int):
        """Per-sample draws are made for the global batch (every rank's generator alike) and sliced to this
        rank's rows: a run then draws the same numbers whatever the number of processes."""
        self.draw_slice = (rank, world)

    draw_slice: tuple[int, int] | None = None

    def _draw(self, fn, shape: tuple[int, ...]) -> Tensor:
        if self.draw_slice is None or not shape:
            return fn(shape, generator=self.gen).to(self.device)
        r, w = self.draw_slice
        n = shape[0]
        return fn((n * w, *shape[1:]), generator=self.gen)[r * n: (r + 1) * n].to(self.device)

    def rand(self, *shape: int) -> Tensor:
        return self._draw(torch.rand, shape)

    def randn(self, *shape: int) -> Tensor:
        return self._draw(torch.randn, shape)

    @classmethod
    def check_config(cls, cfg, loop_fields: set[str]):
        """Refuse, before anything is built, a config that sets what this method would ignore."""
        refuse_unused(cfg, cls, loop_fields if cls.loop_fields is None else set(cls.loop_fields))

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    def after_backward(self):
        """Called by the loop once the step's backward has run (e.g. to unfreeze a role frozen for it)."""

    def export_model(self, weights: dict[str, Tensor]) -> FlowModel:
        """The exported model folder's network, carrying `weights` (the EMA of `ema_network`)."""
        raise NotImplementedError

    def save_export(self, weights: dict[str, Tensor], folder: Path) -> Path:
        """Write the exported model folder (a flowflash model; SD3 students override: a diffusers folder)."""
        from ..models.flow_model import save_model
        return save_model(self.export_model(weights), folder)


def set_fields(cfg, names) -> list[str]:
    """Which of `names` the config sets away from its default."""
    defaults = type(cfg)()
    return [f.name for f in dataclasses.fields(cfg) if f.name in names and getattr(cfg, f.name) != getattr(defaults, f.name)]


def refuse_unused(cfg, method: type[Method], loop_fields: set[str], why: str = ""):
    """Flags a method ignores are an error, not silently dropped."""
    unused = set_fields(cfg, {f.name for f in dataclasses.fields(cfg)} - loop_fields - method.uses)
    refuse(method, unused, why)


def refuse(method: type[Method], fields: list[str], why: str = ""):
    if fields:
        raise FlowflashError(f"method {method.name!r} does not use {', '.join(fields)}{why}; remove "
                             f"{'it' if len(fields) == 1 else 'them'} from the config")


# ------------------------------------------------------------------ conditioning and velocity of a role
def condition(model, b, use_light: Tensor | bool = True,
              use_minilm: Tensor | bool | None = None) -> tuple[Tensor, Tensor]:
    """(context, pooled) of the batch for a role. An emoji batch runs the role's own light encoder (each role
    has its copy) beside the batch's MiniLM states; a latent batch holds cached embeddings. A False nulls an
    encoder (all False: the CFG null)."""
    n = b.noise.shape[0]
    as_mask = lambda m: m if torch.is_tensor(m) else torch.full((n,), bool(m), dtype=torch.bool, device=b.noise.device)
    use_minilm = use_light if use_minilm is None else use_minilm
    return b.condition(model, as_mask(use_light), as_mask(use_minilm))


def velocity(model, x: Tensor, t: Tensor, b, guidance: float = 1.0) -> Tensor:
    """v(x, t | text), with classifier-free guidance when guidance != 1 (one batched call)."""
    ctx, pooled = condition(model, b, True)
    if guidance == 1.0:
        return model(x, t, ctx, pooled)
    uctx, upooled = condition(model, b, False)
    ctx, pooled = torch.cat([ctx, uctx]), torch.cat([pooled, upooled])
    return guided_velocity(lambda x_, t_: model(x_, t_, ctx, pooled), x, t, guidance)


def full_t(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
