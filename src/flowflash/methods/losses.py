"""Training losses as pure functions of tensors (no modules, no optimizers, no flow algebra: that is
in sampling/flow.py)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def flow_matching(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """The critic's loss: regress the velocity of the (student's) samples."""
    return F.mse_loss(v_pred, v_target)


def trajectory_regression(student_x: Tensor, teacher_x: Tensor) -> Tensor:
    """Trajectory guidance: the student's state after one of its steps vs the teacher's ODE state."""
    return F.mse_loss(student_x, teacher_x)


def dmd_direction(x0_student: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-6,
                  norm_real: Tensor | None = None, normalise: bool = True) -> Tensor:
    """DMD2's normalised update direction (fake - real), scaled per sample by mean |x0 - x0_real|. `norm_real`:
    the real score's x0 to normalise against, when it is taken at another point than the direction's."""
    if not normalise:
        return x0_fake - x0_real
    dims = tuple(range(1, x0_student.dim()))
    ref = x0_real if norm_real is None else norm_real
    norm = (x0_student - ref).abs().mean(dim=dims, keepdim=True).clamp(min=eps)
    return (x0_fake - x0_real) / norm


def distribution_matching(x: Tensor, direction: Tensor) -> Tensor:
    """Surrogate whose gradient wrt x is `direction` / numel: 0.5 ||x - sg(x - direction)||^2."""
    return 0.5 * F.mse_loss(x, (x - direction).detach(), reduction="sum") / x.numel()


def gan_generator(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
