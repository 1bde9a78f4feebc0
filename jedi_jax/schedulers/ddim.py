"""DDIM step (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12), pure and jit-able.

    x_{t'} = sqrt(abar_{t'}) x0_hat
             + sqrt(1 - abar_{t'} - s_t^2) eps_hat
             + s_t z,                               z ~ N(0, I)
    s_t    = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})     (eq. 16)

with t' = t_prev < t. eta = 0 is the deterministic DDIM sampler, eta = 1 ancestral DDPM. For t' < 0
(the final step) abar_{t'} is `schedule.final_alpha_cumprod` (diffusers' `set_alpha_to_one`).
Numerically identical to diffusers' `DDIMScheduler.step` (thresholding off, use_clipped_model_output off).
With a zero-terminal-SNR schedule (abar_{T-1} = 0) use v_prediction: epsilon models give x0 = inf at
t = T-1, exactly as in diffusers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jedi_jax.schedulers.schedule import NoiseSchedule, bcast, x0_eps_from_output


def ddim_prev_timesteps(timesteps, num_train_timesteps: int, num_inference_steps: int | None = None):
    """diffusers' DDIM previous timestep: t - T // num_inference_steps (NOT the next entry of `timesteps`;
    the two coincide for "leading" spacing). `num_inference_steps` defaults to len(timesteps); pass the
    full count when `timesteps` is a truncated schedule (img2img). Same type/shape as `timesteps`."""
    n = int(num_inference_steps if num_inference_steps is not None else np.shape(timesteps)[0])
    return timesteps - num_train_timesteps // n


def ddim_step(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, t_prev: jax.Array,
              x_t: jax.Array, *, prediction_type: str, eta: float = 0.0, key: jax.Array | None = None,
              clip_sample: float | None = None) -> jax.Array:
    """One DDIM update x_t -> x_{t_prev}.

    Args:
      schedule: the noise schedule (pytree).
      model_output: (B, ...) network output (epsilon or v, per `prediction_type`), same shape as x_t.
      t, t_prev: int timesteps, scalar or leading dims of x_t (e.g. (B,) for x_t (B, N, h, w, C)); may
        be traced. t_prev < 0 selects `schedule.final_alpha_cumprod`.
      x_t: (B, ...) current sample.
      prediction_type: "epsilon" | "v_prediction" (static).
      eta: static python float, noise scale (0 = deterministic DDIM).
      key: PRNG key, required iff eta > 0; the noise is `jax.random.normal(key, x_t.shape, float32)`.
      clip_sample: if not None, x0_hat is clipped to [-clip_sample, clip_sample] (diffusers' clip_sample
        with clip_sample_range); eps_hat is not recomputed (diffusers' default).
    Returns:
      x_{t_prev}, shape and dtype of x_t (math in float32).
    """
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:  # above 1 the variance exceeds 1 - abar_prev (NaN); NaN fails too
        raise ValueError(f"eta={eta} must be in [0, 1] (1 = ancestral DDPM)")
    if eta > 0 and key is None:
        raise ValueError("ddim_step with eta > 0 needs a PRNG `key`")
    t = jnp.asarray(t, jnp.int32)
    t_prev = jnp.asarray(t_prev, jnp.int32)
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], schedule.final_alpha_cumprod)
    x = x_t.astype(jnp.float32)
    out = model_output.astype(jnp.float32)

    x0, eps = x0_eps_from_output(bcast(ab_t**0.5, x), bcast((1.0 - ab_t) ** 0.5, x), x, out, prediction_type)
    if clip_sample is not None:
        x0 = jnp.clip(x0, -clip_sample, clip_sample)

    a_prev = bcast(ab_prev, x)
    if eta > 0:
        variance = ((1.0 - ab_prev) / (1.0 - ab_t)) * (1.0 - ab_t / ab_prev)  # eq. 16 without eta
        std = bcast(eta * variance**0.5, x)
    else:
        std = jnp.zeros((), jnp.float32)
    # "direction pointing to x_t". At eta = 1 and abar_t ~ 0 (cosine's t = 999, zero terminal SNR) the
    # radicand is 0 in exact arithmetic and -6e-8 in float32: clamp, or the whole sample is NaN.
    direction = jnp.maximum(1.0 - a_prev - std**2, 0.0) ** 0.5 * eps
    x_prev = a_prev**0.5 * x0 + direction
    if eta > 0:
        x_prev = x_prev + std * jax.random.normal(key, x.shape, jnp.float32)
    return x_prev.astype(x_t.dtype)
