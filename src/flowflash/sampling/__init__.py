"""Flow math and samplers: short pure functions (see flow.py)."""
from .flow import (add_noise, cfg_velocity, dynamic_shift_mu, euler_step, exponential_shift, guided_velocity, logit_normal_t,
                   noise_from_v, sample, shift_from_scheduler_config, subdivide, time_shift, timesteps,
                   v_from_x0, velocity_target, x0_from_v)

__all__ = ["add_noise", "cfg_velocity", "dynamic_shift_mu", "euler_step", "exponential_shift", "guided_velocity",
           "logit_normal_t",
           "noise_from_v", "sample", "shift_from_scheduler_config", "subdivide", "time_shift", "timesteps",
           "v_from_x0", "velocity_target", "x0_from_v"]
