import pytest
import torch

from flowflash.sampling import (add_noise, cfg_velocity, dynamic_shift_mu, euler_step, exponential_shift,
                                guided_velocity, noise_from_v, sample, shift_from_scheduler_config, subdivide,
                                time_shift, timesteps, v_from_x0, velocity_target, x0_from_v)


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


def test_conversions_are_mutually_inverse_on_the_path():
    x0, eps, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0.9, 0.5, 0.1])
    xt = add_noise(x0, eps, t)
    v = velocity_target(x0, eps)
    assert torch.allclose(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert torch.allclose(x0_from_v(xt, t, v), x0, atol=1e-5)
    assert torch.allclose(noise_from_v(xt, t, v), eps, atol=1e-5)
    assert torch.allclose(v_from_x0(xt, t, x0), v, atol=1e-4)
    assert torch.equal(add_noise(x0, eps, 0.0), x0) and torch.equal(add_noise(x0, eps, 1.0), eps)


def test_dynamic_shift_agrees_with_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    for n in (256, 1024, 4096):
        assert dynamic_shift_mu(n) == pytest.approx(calculate_shift(n))  # diffusers' mu for n image tokens
    dyn = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
           "base_shift": 0.5, "max_shift": 1.15}
    for kind in ("exponential", "linear"):
        sched = FlowMatchEulerDiscreteScheduler(**dyn, time_shift_type=kind)
        mu = calculate_shift(1024)
        ours = time_shift(t, shift_from_scheduler_config({**sched.config}, 1024))
        assert torch.allclose(ours, torch.as_tensor(sched.time_shift(mu, 1.0, t.numpy()), dtype=torch.float64))
    assert torch.allclose(exponential_shift(t, 0.7), time_shift(t, torch.tensor(0.7).exp().item()))
    assert shift_from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)) == 3.0
    with pytest.raises(ValueError, match="image_seq_len"):
        shift_from_scheduler_config(dyn)
    with pytest.raises(ValueError, match="only the shifted uniform schedule"):
        shift_from_scheduler_config({"shift": 3.0, "shift_terminal": 0.02})


def test_guided_velocity_is_one_batched_call_with_the_cfg_formula():
    calls = []

    def both(x, t):
        calls.append(x.shape[0])
        return torch.cat([torch.full_like(x[:1], 2.0), torch.full_like(x[1:], 1.0)])  # cond rows, then uncond
    out = guided_velocity(both, torch.zeros(1, 3), torch.zeros(1), 3.0)
    assert calls == [2] and torch.equal(out, torch.full((1, 3), 4.0))


def test_subdivide_splits_an_interval_evenly():
    assert subdivide(0.8, 0.6, 4).tolist() == pytest.approx([0.8, 0.75, 0.7, 0.65, 0.6])


def test_the_model_sees_an_fp32_time_when_the_state_is_bf16():
    seen = []

    def velocity(x, t):
        seen.append(t.dtype)
        return torch.zeros_like(x)
    out = sample(velocity, torch.zeros(2, 3, dtype=torch.bfloat16), timesteps(2, 3.0))
    assert seen == [torch.float32, torch.float32] and out.dtype == torch.bfloat16
    sample(velocity, torch.zeros(2, 3), timesteps(1))
    assert seen[-1] == torch.float32
