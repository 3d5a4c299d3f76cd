"""Merging split-timestep branches by weight interpolation."""
from __future__ import annotations

import torch

from ..errors import FlowflashError
from ..models.flow_model import FlowModel


def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """ratio * a + (1 - ratio) * b for every floating tensor; both must hold the same keys and shapes."""
    if set(a) != set(b):
        raise ValueError(f"branches differ in tensors: {sorted(set(a) ^ set(b))[:3]}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"merge ratio must lie in [0, 1], got {ratio}")
    out = {}
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"shape mismatch for {k}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
        out[k] = (ratio * a[k].float() + (1 - ratio) * b[k].float()).to(a[k].dtype) if a[k].is_floating_point() else a[k]
    return out


def check_branches(a, b, name_a, name_b):
    """Only branches of one model merge: same transformer shape and vocabulary."""
    if not a.cfg.same_network(b.cfg):
        raise FlowflashError(f"{name_a} and {name_b} are different architectures; only branches of one model merge")


def merged(a: FlowModel, b: FlowModel, ratio: float) -> FlowModel:
    """ratio * A + (1 - ratio) * B as a new model (A's config)."""
    m = FlowModel(a.cfg)
    m.load_state_dict(interpolate(a.state_dict(), b.state_dict(), ratio))
    return m.eval().requires_grad_(False)
