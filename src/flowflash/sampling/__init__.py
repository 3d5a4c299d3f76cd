from .flow import cfg_velocity, euler_step, sample, time_shift, timesteps

__all__ = ["cfg_velocity", "euler_step", "sample", "time_shift", "timesteps"]
