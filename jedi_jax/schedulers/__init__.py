"""Noise schedules and samplers as pure functions (DDIM, DPM-Solver++(2M)); state is pytrees."""
from jedi_jax.schedulers.ddim import ddim_prev_timesteps, ddim_step
from jedi_jax.schedulers.dpm_solver import DPMState, dpm_init_state, dpm_sigma, dpm_step
from jedi_jax.schedulers.loop import sample_loop
from jedi_jax.schedulers.schedule import (
    NoiseSchedule,
    NoiseScheduleConfig,
    add_noise,
    inference_timesteps,
    make_betas,
    make_schedule,
    predict_x0_eps,
    rescale_zero_terminal_snr,
    v_target,
)

__all__ = [
    "NoiseScheduleConfig", "NoiseSchedule", "make_schedule", "make_betas", "rescale_zero_terminal_snr",
    "inference_timesteps", "add_noise", "v_target", "predict_x0_eps",
    "ddim_step", "ddim_prev_timesteps",
    "DPMState", "dpm_init_state", "dpm_sigma", "dpm_step",
    "sample_loop",
]
