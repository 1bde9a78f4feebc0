"""DPM-Solver++(2M): multistep second-order data-prediction ODE solver (Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 2), pure and
jit-able inside `lax.fori_loop` with a traced step index.

With alpha_i = 1/sqrt(1 + sigma_i^2), s_i = sigma_i alpha_i, lambda_i = log(alpha_i) - log(s_i) and
x0_i the data prediction at step i, the update from step i to i+1 (h = lambda_{i+1} - lambda_i) is

    x_{i+1} = (s_{i+1}/s_i) x_i - alpha_{i+1} (e^{-h} - 1) (D0 + D1/2),
    D0 = x0_i,   D1 = (h / h_prev) (x0_i - x0_{i-1})           (second order, "midpoint")
    D1 = 0                                                      (first order = DDIM)

First order is used on the first step of a solve and on the last step (diffusers' `lower_order_final`
with `final_sigmas_type="zero"`: the final sigma is 0, so the last step returns x0 exactly).
Matches diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")`, incl. its float32
sigma -> (alpha, sigma, lambda) arithmetic.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jedi_jax.schedulers.schedule import NoiseSchedule, x0_eps_from_output

# diffusers replaces abar_{T-1} = 0 (zero terminal SNR) by 2^-24 so that sigma stays finite.
_MIN_ALPHA_CUMPROD = 2.0**-24


@struct.dataclass
class DPMState:
    """Multistep memory, carried through `lax.fori_loop`."""

    prev_x0: jax.Array  # shape of x, float32: data prediction of the previous step (x0_{i-1})
    steps_taken: jax.Array  # () int32: steps done in this solve (diffusers' `lower_order_nums`, unclipped)


def dpm_init_state(x: jax.Array) -> DPMState:
    """Fresh state for a solve over samples shaped like x (B, ...)."""
    return DPMState(prev_x0=jnp.zeros(x.shape, jnp.float32), steps_taken=jnp.zeros((), jnp.int32))


def dpm_sigma(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """VE sigma_t = sqrt((1 - abar_t) / abar_t) at integer timesteps t (any shape), float32."""
    # Only an abar of exactly 0 (zero terminal SNR) is floored, as diffusers does: flooring every abar
    # would lift the cosine schedule's abar_999 = 2.4e-9 and start its solve at sigma 4096, not 20291.
    ab = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    ab = jnp.where(ab > 0, ab, _MIN_ALPHA_CUMPROD)
    return ((1.0 - ab) / ab) ** 0.5


def _alpha_sigma_lambda(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    alpha = 1.0 / (sigma**2 + 1.0) ** 0.5
    s = sigma * alpha
    return alpha, s, jnp.log(alpha) - jnp.log(s)  # lambda = +inf at sigma = 0


def dpm_step(schedule: NoiseSchedule, state: DPMState, model_output: jax.Array, step_index: jax.Array,
             timesteps: jax.Array, x_t: jax.Array, *, prediction_type: str,
             num_steps: int | None = None) -> tuple[jax.Array, DPMState]:
    """One DPM-Solver++(2M) step from timesteps[step_index] to timesteps[step_index + 1] (or to sigma = 0
    after the last entry).

    Args:
      schedule: noise schedule.
      state: `DPMState` from `dpm_init_state` or the previous step.
      model_output: (B, ...) network output at (x_t, timesteps[step_index]) (epsilon or v).
      step_index: int, may be traced; position in `timesteps`.
      timesteps: (n,) int descending timesteps of the solve (e.g. `inference_timesteps(cfg, n,
        "dpmpp_2m")`, or a tail of it for img2img); may be traced, its length is static.
      x_t: (B, ...) current sample.
      prediction_type: "epsilon" | "v_prediction" (static).
      num_steps: static len(timesteps); optional, checked against timesteps.shape[0].
    Returns:
      (x_next with shape/dtype of x_t, new state).
    """
    timesteps = jnp.asarray(timesteps, jnp.int32)
    n = int(timesteps.shape[0])
    if num_steps is not None and int(num_steps) != n:
        raise ValueError(f"num_steps={num_steps} != len(timesteps)={n}")
    i = jnp.asarray(step_index, jnp.int32)

    sigma_s0 = dpm_sigma(schedule, timesteps[i])
    sigma_s1 = dpm_sigma(schedule, timesteps[jnp.maximum(i - 1, 0)])
    sigma_t = jnp.where(i + 1 < n, dpm_sigma(schedule, timesteps[jnp.minimum(i + 1, n - 1)]), 0.0)
    alpha_s0, s_s0, lambda_s0 = _alpha_sigma_lambda(sigma_s0)
    _, _, lambda_s1 = _alpha_sigma_lambda(sigma_s1)
    alpha_t, s_t, lambda_t = _alpha_sigma_lambda(sigma_t)

    x = x_t.astype(jnp.float32)
    m0, _ = x0_eps_from_output(alpha_s0, s_s0, x, model_output.astype(jnp.float32), prediction_type)
    m1 = state.prev_x0

    # first order on the first step of a solve and on the final (sigma -> 0) step
    second = (state.steps_taken >= 1) & (i < n - 1)
    h = lambda_t - lambda_s0
    h_0 = lambda_s0 - lambda_s1
    r0 = jnp.where(second, h_0 / jnp.where(second, h, 1.0), 1.0)  # keep the unused branch finite
    d1 = jnp.where(second, (1.0 / r0) * (m0 - m1), 0.0)
    c = alpha_t * (jnp.exp(-h) - 1.0)
    x_next = (s_t / s_s0) * x - c * m0 - 0.5 * c * d1  # d1 = 0: exactly the first-order (DDIM) update

    return x_next.astype(x_t.dtype), DPMState(prev_x0=m0, steps_taken=state.steps_taken + 1)
