"""Discrete-time VP noise schedules (DDPM / Stable Diffusion), as data plus pure functions.

The forward process is q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with
abar_t = prod_{s <= t} (1 - beta_s), t in {0, ..., T-1} (Ho et al. 2020; Song et al. 2021, "DDIM", eq. 4).

* `NoiseScheduleConfig` is the static description (hashable, read from / written to a diffusers
  `scheduler_config.json`).
* `NoiseSchedule` (a `flax.struct.dataclass`, i.e. a pytree) holds the float32 arrays; pass it to jitted
  functions as an argument.
* The numbers reproduce diffusers' `DDIMScheduler` / `DPMSolverMultistepScheduler` construction
  (float32 betas, float32 `1 - beta`, cumulative product accumulated in float64 like torch's CPU
  `cumprod`), so schedules agree with diffusers to float32 rounding.

Shapes: a timestep array `t` holds the *leading* dims of the sample it applies to. With latents
`x (B, N, h, w, C)` pass `t (B,)` (per set), `t (B, N)` (per member) or a scalar; coefficients are
broadcast over the trailing dims.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "dpmpp_2m")

# diffusers config keys that we do not implement: key -> the only value(s) we accept.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "variance_type": (None, "fixed_small", "fixed_small_log"),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (-math.inf,),
}


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
    """Static noise-schedule description. Defaults are Stable Diffusion v1.x's scheduler config."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} unsupported; use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r} unsupported; use one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing={self.timestep_spacing!r} unsupported; use one of {TIMESTEP_SPACINGS}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 1")

    @property
    def clip_range(self) -> float | None:
        """The x0 clip range for `ddim_step(clip_sample=...)`: `clip_sample_range` or None (no clipping)."""
        return float(self.clip_sample_range) if self.clip_sample else None

    @classmethod
    def from_train_config(cls, d: Mapping[str, Any]) -> "NoiseScheduleConfig":
        """A training config's `schedule` block, as the trainer reads it: keys it leaves out take this
        dataclass's SD 1.x defaults (steps_offset 1, no alpha-to-one, no clipping), NOT diffusers'
        DDIMScheduler defaults as `from_diffusers` gives. Trainer, sample grids, bench and export all
        read it here, so an exported scheduler_config.json (`to_diffusers`) is the schedule trained."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown schedule keys {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "NoiseScheduleConfig":
        """Reads a diffusers `scheduler_config.json` dict.

        Missing keys take diffusers' `DDIMScheduler` defaults (NOT this dataclass's SD defaults), since a
        config dict describes a diffusers scheduler. Keys irrelevant to the schedule (`_class_name`,
        `skip_prk_steps`, ...) are ignored; features we do not implement raise ValueError naming the key.
        """
        for key, ok in _NEUTRAL_VALUES.items():
            if key in d and d[key] not in ok:
                raise ValueError(f"{key}={d[key]!r} is not supported (supported: {ok})")
        return cls(
            num_train_timesteps=int(d.get("num_train_timesteps", 1000)),
            beta_start=float(d.get("beta_start", 0.0001)),
            beta_end=float(d.get("beta_end", 0.02)),
            beta_schedule=str(d.get("beta_schedule", "linear")),
            prediction_type=str(d.get("prediction_type", "epsilon")),
            timestep_spacing=str(d.get("timestep_spacing", "leading")),
            steps_offset=int(d.get("steps_offset", 0)),
            set_alpha_to_one=bool(d.get("set_alpha_to_one", True)),
            # DDIMScheduler's default is True, but a config of another scheduler (DPMSolverMultistep,
            # Euler, PNDM ...) has no clip_sample because that scheduler never clips: clipping SD's
            # latents to [-1, 1] there would be our invention, not the model's
            clip_sample=bool(d.get("clip_sample", d.get("_class_name", "DDIMScheduler") == "DDIMScheduler")),
            clip_sample_range=float(d.get("clip_sample_range", 1.0)),
            rescale_betas_zero_snr=bool(d.get("rescale_betas_zero_snr", False)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A dict accepted by `DDIMScheduler.from_config` (DPMSolverMultistepScheduler ignores DDIM-only keys)."""
        d = dataclasses.asdict(self)
        d["_class_name"] = "DDIMScheduler"
        return d


@struct.dataclass
class NoiseSchedule:
    """Schedule arrays (a pytree; pass into jit). T = num_train_timesteps (static, = betas.shape[0])."""

    betas: jax.Array  # (T,) float32
    alphas_cumprod: jax.Array  # (T,) float32, abar_t
    final_alpha_cumprod: jax.Array  # () float32, abar used for t_prev < 0 (1 if set_alpha_to_one else abar_0)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


# ----------------------------------------------------------------------------- construction


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide cosine schedule (Nichol & Dhariwal 2021), float64 math then float32, as diffusers."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so that abar_{T-1} = 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Alg. 1). float32 arithmetic in diffusers' order. (T,) -> (T,)."""
    betas = np.asarray(betas, np.float32)
    alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
    sqrt_ab = np.sqrt(alphas_cumprod)
    s0, sT = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = sqrt_ab - sT
    sqrt_ab = sqrt_ab * (s0 / (s0 - sT))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _cumprod_f32(a: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod on float32 accumulates in double; this reproduces it bit for bit.
    return np.cumprod(np.asarray(a, np.float32).astype(np.float64)).astype(np.float32)


def make_betas(cfg: NoiseScheduleConfig) -> np.ndarray:
    """(T,) float32 betas for `cfg` (numpy; host-side, done once)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64).astype(np.float32)
    elif cfg.beta_schedule == "scaled_linear":  # latent-diffusion schedule: linear in sqrt(beta)
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=np.float64).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2
        betas = _betas_for_alpha_bar(T)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def make_schedule(cfg: NoiseScheduleConfig) -> NoiseSchedule:
    betas = make_betas(cfg)
    alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
    final = np.float32(1.0) if cfg.set_alpha_to_one else alphas_cumprod[0]
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
    )


# ----------------------------------------------------------------------------- inference timesteps


def inference_timesteps(cfg: NoiseScheduleConfig, num_steps: int, sampler: str = "ddim") -> np.ndarray:
    """Descending int64 timesteps, identical to diffusers' `set_timesteps(num_steps).timesteps`.

    `sampler="ddim"` reproduces `DDIMScheduler`, `sampler="dpmpp_2m"` `DPMSolverMultistepScheduler`
    (with `lambda_min_clipped=-inf`); the two differ for "leading" and "linspace" spacing (the latter
    spaces num_steps + 1 points and drops the last). Both return exactly `num_steps` distinct values
    in [0, T). One deliberate difference: "trailing" spacing is a float `arange(T, 0, -T/n)`, which
    for some n (61, 103, 121, ... with T = 1000) rounds to n + 1 points, the last -1; diffusers keeps
    it (and then reads alphas_cumprod[-1], the noisiest value, as the final step's), we keep the first n.
    Raises ValueError for a count that would repeat a timestep or leave [0, T) (where diffusers returns
    them: dpmpp_2m at n = T, "leading" with steps_offset=1 at n = T).
    """
    T, n = cfg.num_train_timesteps, int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps={n} must be >= 1")
    if sampler == "ddim":
        if n > T:
            raise ValueError(f"num_steps={n} cannot exceed num_train_timesteps={T}")
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n))[:n].astype(np.int64) - 1
    elif sampler == "dpmpp_2m":
        last = T  # lambda_min_clipped = -inf clips nothing
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
        else:  # trailing
            ts = np.arange(last, 0, -T / n).round()[:n].astype(np.int64) - 1
    else:
        raise ValueError(f"sampler={sampler!r} unsupported; use one of {SAMPLERS}")
    # e.g. dpmpp_2m at n >= T repeats t; "leading" with steps_offset=1 at n = T reaches t = T
    if len(ts) != n or ts.min() < 0 or ts.max() >= T or np.any(np.diff(ts) >= 0):
        raise ValueError(f"{n} {sampler} steps with {cfg.timestep_spacing!r} spacing do not fit a {T}-step "
                         "schedule (timesteps would repeat or leave [0, T)): use fewer steps")
    return ts


# ----------------------------------------------------------------------------- forward process helpers


def bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Appends singleton dims so `coef` (leading dims of x, e.g. (B,) or ()) broadcasts against x."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def _abar(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    return schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.  x0, noise (B, ...); t leading dims, e.g. (B,)."""
    ab = _abar(schedule, t)
    out = bcast(jnp.sqrt(ab), x0) * x0.astype(jnp.float32) + bcast(jnp.sqrt(1.0 - ab), x0) * noise.astype(jnp.float32)
    return out.astype(x0.dtype)


def v_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Velocity v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022), diffusers' get_velocity."""
    ab = _abar(schedule, t)
    out = bcast(jnp.sqrt(ab), x0) * noise.astype(jnp.float32) - bcast(jnp.sqrt(1.0 - ab), x0) * x0.astype(jnp.float32)
    return out.astype(x0.dtype)


def x0_eps_from_output(alpha: jax.Array, sigma: jax.Array, x_t: jax.Array, model_output: jax.Array,
                       prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output given x_t = alpha x0 + sigma eps (alpha, sigma broadcastable, float32)."""
    if prediction_type == "epsilon":
        x0 = (x_t - sigma * model_output) / alpha
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * model_output
        eps = alpha * model_output + sigma * x_t
    else:
        raise ValueError(f"prediction_type={prediction_type!r} unsupported; use one of {PREDICTION_TYPES}")
    return x0, eps


def predict_x0_eps(schedule: NoiseSchedule, x_t: jax.Array, model_output: jax.Array, t: jax.Array,
                   prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) predicted from `model_output` at timestep t; float32, shape of x_t. t: leading dims of x_t."""
    ab = _abar(schedule, t)
    alpha, sigma = bcast(jnp.sqrt(ab), x_t), bcast(jnp.sqrt(1.0 - ab), x_t)
    return x0_eps_from_output(alpha, sigma, x_t.astype(jnp.float32), model_output.astype(jnp.float32),
                              prediction_type)
