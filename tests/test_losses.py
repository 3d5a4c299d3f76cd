"""The losses of methods/losses.py, checked against what each one is meant to compute."""
import math

import torch

from flowflash.methods.losses import (distribution_matching, dmd_direction, flow_matching, gan_discriminator,
                                      gan_generator, trajectory_regression)


def test_flow_matching_and_trajectory_regression_are_mean_squared_errors():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert flow_matching(a, b).item() == (0 + 4 + 9 + 0) / 4
    assert trajectory_regression(a, b).item() == flow_matching(a, b).item()
    assert flow_matching(a, a).item() == 0.0


def test_dmd_direction_is_fake_minus_real_over_the_per_sample_mean_error():
    x = torch.zeros(2, 1, 2, 2)
    real = torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), -0.5)])
    fake = real + 1.0
    d = dmd_direction(x, real, fake)
    # sample 0: |x - real| has mean 2 -> direction 1/2; sample 1: mean 0.5 -> direction 2
    assert torch.allclose(d[0], torch.full((1, 2, 2), 0.5)) and torch.allclose(d[1], torch.full((1, 2, 2), 2.0))
    # the normaliser is clamped, so a student already at the real x0 gets a finite direction
    assert torch.isfinite(dmd_direction(real, real, fake)).all()


def test_distribution_matching_surrogate_has_the_direction_as_its_gradient():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    direction = torch.randn(2, 3, 4, 4)
    loss = distribution_matching(x, direction)
    loss.backward()
    assert torch.allclose(x.grad, direction / x.numel(), atol=1e-7)
    assert math.isclose(loss.item(), 0.5 * direction.pow(2).sum().item() / x.numel(), rel_tol=1e-5)


def test_gan_losses_are_the_non_saturating_logistic_losses():
    zero = torch.zeros(4, 2)
    assert math.isclose(gan_generator(zero).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(gan_discriminator(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    big = torch.full((4, 2), 20.0)
    assert gan_generator(big).item() < 1e-6  # fakes judged real: nothing left for the generator
    assert gan_discriminator(big, -big).item() < 1e-6  # a perfect discriminator
    assert gan_discriminator(-big, big).item() > 39  # the opposite
