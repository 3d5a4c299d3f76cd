import pytest
import torch

from flowflash.sampling import cfg_velocity, euler_step, sample, time_shift, timesteps


def test_time_shift_identity_and_direction():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(time_shift(t, 1.0), t)
    s = time_shift(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all()  # shift > 1 spends more time near noise


def test_timesteps_endpoints_and_errors():
    ts = timesteps(4, 1.0)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        timesteps(0)


def test_euler_recovers_x0_on_a_straight_flow():
    # On the straight path the exact velocity is eps - x0 everywhere, so any number of Euler steps lands on x0.
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for n in (1, 3, 7):
        out = sample(lambda x, t: eps - x0, eps, timesteps(n, 2.0))
        assert torch.allclose(out, x0, atol=1e-5)
    assert torch.allclose(euler_step(eps, eps - x0, 1.0, 0.0), x0, atol=1e-6)


def test_cfg_formula():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_velocity(c, u, 1.0) == c and cfg_velocity(c, u, 0.0) == u and cfg_velocity(c, u, 3.0) == 4.0
