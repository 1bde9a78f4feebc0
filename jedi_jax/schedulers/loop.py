"""Whole-trajectory sampling with `lax.fori_loop` (one compiled body, any number of steps).

The caller supplies `denoise_fn(x_t, t, i) -> model_output` (t: () int32 timestep, i: () int32 step
index; both traced); the joint sampler (sampling/joint.py) wraps the UNet, the set structure and
guidance there, and re-noises the known members through `pre_step`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jedi_jax.schedulers.ddim import ddim_prev_timesteps, ddim_step
from jedi_jax.schedulers.dpm_solver import dpm_init_state, dpm_step
from jedi_jax.schedulers.schedule import SAMPLERS, NoiseSchedule

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# pre_step(x_t, t, i) -> x_t: edits the state before the model sees it (e.g. known set members)
PreStepFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sample_loop(denoise_fn: DenoiseFn, x_T: jax.Array, timesteps, schedule: NoiseSchedule, *,
                sampler: str = "ddim", prediction_type: str = "epsilon", eta: float = 0.0,
                key: jax.Array | None = None, clip_sample: float | None = None,
                prev_timesteps=None, pre_step: PreStepFn | None = None,
                on_step: Callable[[jax.Array], None] | None = None) -> jax.Array:
    """Runs the reverse process over `timesteps` and returns x_0.

    Args:
      denoise_fn: (x_t (B, ...), t () int32, i () int32) -> model output (B, ...).
      x_T: (B, ...) initial sample (e.g. (B, N, h, w, C) unit Gaussian latents; for img2img a noised
        latent at timesteps[0]).
      timesteps: (n,) descending int timesteps (`inference_timesteps(cfg, n, sampler)` or a tail of it);
        n is static.
      schedule: noise schedule.
      sampler: "ddim" (Song et al. 2021, eq. 12) or "dpmpp_2m" (Lu et al. 2022, Alg. 2). Static.
      prediction_type: "epsilon" | "v_prediction". Static.
      eta: DDIM noise scale (static float); > 0 needs `key`; step i uses `jax.random.fold_in(key, i)`.
        Must be 0 for "dpmpp_2m".
      clip_sample: DDIM x0 clip range or None.
      prev_timesteps: (n,) DDIM target timesteps; default diffusers' t - T // n (`ddim_prev_timesteps`).
      pre_step: optional (x_t, t, i) -> x_t applied at the start of every step; the model and the
        update both see its result (the joint sampler's re-noised references).
      on_step: optional host callback with the step index after each step (progress bars).
    Returns:
      x_0 estimate, shape/dtype of x_T.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} unsupported; use one of {SAMPLERS}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:  # NaN would run as 0: every comparison with it is False
        raise ValueError(f"eta={eta} must be in [0, 1]")
    if eta > 0 and key is None:
        raise ValueError("sample_loop with eta > 0 needs a PRNG `key`")
    timesteps = jnp.asarray(timesteps, jnp.int32)
    n = int(timesteps.shape[0])
    pre = pre_step or (lambda x, t, i: x)

    def report(i, carry):
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return carry

    if sampler == "ddim":
        if prev_timesteps is None:
            prev_timesteps = ddim_prev_timesteps(timesteps, schedule.num_train_timesteps)
        prev_timesteps = jnp.asarray(prev_timesteps, jnp.int32)
        if prev_timesteps.shape != timesteps.shape:
            raise ValueError(f"prev_timesteps shape {prev_timesteps.shape} != timesteps shape {timesteps.shape}")

        def body(i, x):
            t = timesteps[i]
            x = pre(x, t, i)
            out = denoise_fn(x, t, i)
            step_key = jax.random.fold_in(key, i) if eta > 0 else None
            x = ddim_step(schedule, out, t, prev_timesteps[i], x, prediction_type=prediction_type,
                          eta=eta, key=step_key, clip_sample=clip_sample)
            return report(i, x)

        return jax.lax.fori_loop(0, n, body, x_T)

    if eta != 0.0:
        raise ValueError("dpmpp_2m is deterministic; eta must be 0")

    def body_dpm(i, carry):
        x, state = carry
        x = pre(x, timesteps[i], i)
        out = denoise_fn(x, timesteps[i], i)
        return report(i, dpm_step(schedule, state, out, i, timesteps, x, prediction_type=prediction_type))

    x0, _ = jax.lax.fori_loop(0, n, body_dpm, (x_T, dpm_init_state(x_T)))
    return x0
