"""Parity of jedi_jax.schedulers with diffusers' DDIMScheduler / DPMSolverMultistepScheduler.

Tolerance: float32 on both sides, same formulas; per-step max |ours - diffusers| <= 1e-5 * max(1, max|ref|)
(the first DDIM x0 of an epsilon model is ~1/sqrt(abar_T) ~ 15x the input scale).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra: a missing reference is a failure, not a skip
import diffusers

from jedi_jax.schedulers import (
    NoiseScheduleConfig,
    add_noise,
    ddim_prev_timesteps,
    ddim_step,
    dpm_init_state,
    dpm_step,
    inference_timesteps,
    make_betas,
    make_schedule,
    predict_x0_eps,
    rescale_zero_terminal_snr,
    sample_loop,
    v_target,
)

SD = NoiseScheduleConfig()  # scaled_linear 0.00085..0.012, leading, steps_offset 1, set_alpha_to_one False
TRAILING = NoiseScheduleConfig(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="trailing",
                               steps_offset=0, set_alpha_to_one=True)
ZSNR = dataclasses.replace(SD, timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True,
                           prediction_type="v_prediction")
# JeDi-mini's schedule (configs/mini.py): abar_999 = 2.4e-9, below the 2**-24 floor DPM-Solver uses for
# zero terminal SNR, and where DDIM's eta = 1 radicand rounds below 0
COSINE = NoiseScheduleConfig(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", steps_offset=0,
                             set_alpha_to_one=False, prediction_type="v_prediction")
CASES = [(SD, "epsilon"), (SD, "v_prediction"), (TRAILING, "epsilon"), (TRAILING, "v_prediction"),
         (ZSNR, "v_prediction"), (COSINE, "v_prediction"), (COSINE, "epsilon")]
CASE_IDS = ["sd-eps", "sd-v", "trailing-eps", "trailing-v", "zsnr-v", "cosine-v", "cosine-eps"]
SHAPE = (2, 3, 4, 4, 4)  # (B, N, h, w, C)


def _tol(ref) -> float:
    return 1e-5 * max(1.0, float(np.abs(ref).max()))


def _ddim_ref(cfg, pred):
    return diffusers.DDIMScheduler(**{**dataclasses.asdict(cfg), "prediction_type": pred})


def _dpm_ref(cfg, pred):
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset",
            "rescale_betas_zero_snr")
    return diffusers.DPMSolverMultistepScheduler(**{k: getattr(cfg, k) for k in keys}, prediction_type=pred)


def _key(seed):
    # "rbg" keys: threefry's normal() takes ~5 s to compile on CPU; the samplers accept any key impl.
    return jax.random.key(seed, impl="rbg")


def _outputs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n,) + SHAPE).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("prediction_type", "eta", "clip"))
def _ddim_jit(schedule, out, t, t_prev, x, key, *, prediction_type, eta, clip=None):
    return ddim_step(schedule, out, t, t_prev, x, prediction_type=prediction_type, eta=eta,
                     key=key if eta > 0 else None, clip_sample=clip)


@functools.partial(jax.jit, static_argnames=("prediction_type",))
def _dpm_jit(schedule, state, out, i, timesteps, x, *, prediction_type):
    return dpm_step(schedule, state, out, i, timesteps, x, prediction_type=prediction_type)


# ----------------------------------------------------------------------------- schedule construction


@pytest.mark.parametrize("cfg", [SD, TRAILING, ZSNR, NoiseScheduleConfig(beta_schedule="squaredcos_cap_v2"),
                                 dataclasses.replace(TRAILING, rescale_betas_zero_snr=True)])
def test_schedule_arrays_match_diffusers(cfg):
    ref = _ddim_ref(cfg, cfg.prediction_type)
    s = make_schedule(cfg)
    ac, ref_ac = np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy()
    if not cfg.rescale_betas_zero_snr:
        np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ac, ref_ac, rtol=2e-6, atol=1e-12)
    else:
        # betas = 1 - abar_t/abar_{t-1} is ill-conditioned in float32: torch's CPU sqrt is not correctly
        # rounded (1 ulp off on ~20% of entries), which moves betas by up to ~3e-6 (abs); abar agrees to 1e-6.
        np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), atol=2e-5)
        np.testing.assert_allclose(ac, ref_ac, atol=1e-6)
        np.testing.assert_allclose(np.sqrt(1 - ac), np.sqrt(1 - ref_ac), atol=5e-6)
        assert float(s.alphas_cumprod[-1]) == 0.0 == float(ref_ac[-1])
    assert float(s.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_rescale_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_rescale

    for cfg in (SD, TRAILING):
        betas = make_betas(cfg)
        got, want = rescale_zero_terminal_snr(betas), ref_rescale(torch.from_numpy(betas)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)  # measured ~3e-6, see above
        assert got[-1] == want[-1] == 1.0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_inference_timesteps(spacing, offset):
    cfg = dataclasses.replace(SD, timestep_spacing=spacing, steps_offset=offset)
    ddim, dpm = _ddim_ref(cfg, "epsilon"), _dpm_ref(cfg, "epsilon")
    overshoots = 0
    for n in (1, 7, 10, 20, 25, 50, 61, 103, 999, 1000):
        for ref, sampler in ((ddim, "ddim"), (dpm, "dpmpp_2m")):
            ref.set_timesteps(n)
            want = ref.timesteps.numpy()
            if len(want) == n + 1 and want[-1] == -1:  # diffusers' float arange overshoots ("trailing", n=61, 103)
                want, overshoots = want[:n], overshoots + 1
            if len(np.unique(want)) < n or want.max() >= cfg.num_train_timesteps:  # diffusers repeats or
                with pytest.raises(ValueError, match="repeat"):  # leaves the schedule (n = T): we refuse
                    inference_timesteps(cfg, n, sampler)
            else:
                np.testing.assert_array_equal(inference_timesteps(cfg, n, sampler), want)
    assert (overshoots > 0) == (spacing == "trailing")  # the case the first-n rule exists for is exercised


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_are_n_distinct_steps_or_an_error(spacing):
    """Every step count gives exactly n distinct descending timesteps in [0, T), or a ValueError: never
    a -1 (which would index alphas_cumprod from the end) or a repeat (a zero-length DPM-Solver step)."""
    cfg = dataclasses.replace(SD, timestep_spacing=spacing)
    T = cfg.num_train_timesteps
    for sampler in ("ddim", "dpmpp_2m"):
        for n in range(1, T + 3):
            try:
                ts = inference_timesteps(cfg, n, sampler)
            except ValueError:
                assert n >= T - 1, (sampler, n)  # only counts near the schedule's length are refused
                continue
            assert len(ts) == n and ts.min() >= 0 and ts.max() < T and np.all(np.diff(ts) < 0), (sampler, n)


def test_add_noise_and_velocity():
    cfg = SD
    ref, s = _ddim_ref(cfg, "epsilon"), make_schedule(cfg)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], np.int64)  # (B,), broadcast over (N, h, w, C)
    for ours, theirs in [(add_noise, ref.add_noise), (v_target, ref.get_velocity)]:
        got = np.asarray(ours(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
        want = theirs(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)
    # predict_x0_eps inverts the forward process for both parameterizations
    t = jnp.array([10, 700])
    xt = add_noise(s, jnp.asarray(x0), jnp.asarray(noise), t)
    for pred, out in [("epsilon", jnp.asarray(noise)), ("v_prediction", v_target(s, jnp.asarray(x0), jnp.asarray(noise), t))]:
        x0_hat, eps_hat = predict_x0_eps(s, xt, out, t, pred)
        np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(eps_hat), noise, atol=1e-4)


def test_config_diffusers_roundtrip():
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    assert NoiseScheduleConfig.from_diffusers(sd15) == SD
    d = TRAILING.to_diffusers()
    assert NoiseScheduleConfig.from_diffusers(d) == TRAILING
    np.testing.assert_array_equal(diffusers.DDIMScheduler.from_config(d).betas.numpy(),
                                  _ddim_ref(TRAILING, "epsilon").betas.numpy())
    # a config of a scheduler that never clips gets no clipping; a DDIM config without the key does (its default)
    dpm = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "solver_order": 2, "algorithm_type": "dpmsolver++"}
    assert NoiseScheduleConfig.from_diffusers(dpm).clip_sample is False
    assert NoiseScheduleConfig.from_diffusers({**dpm, "_class_name": "DDIMScheduler"}).clip_sample is True
    assert diffusers.DDIMScheduler.from_config({**dpm, "_class_name": "DDIMScheduler"}).config.clip_sample is True
    for key, bad in [("beta_schedule", "sigmoid"), ("prediction_type", "sample"), ("timestep_spacing", "karras"),
                     ("trained_betas", [0.1, 0.2]), ("thresholding", True), ("use_karras_sigmas", True)]:
        with pytest.raises(ValueError, match=key):
            NoiseScheduleConfig.from_diffusers({**sd15, key: bad})


# ----------------------------------------------------------------------------- step-by-step parity


def _ddim_step_float64(ref, out, t, prev, x, noise, pred):
    """One DDPM-ancestral (eta = 1) DDIM step (Song et al. 2021, eq. 12) in float64 on diffusers'
    alphas, the direction's radicand clamped at 0: the reference where diffusers' float32 gives NaN."""
    abar = ref.alphas_cumprod.double().numpy()
    a_t, a_prev = abar[t], (abar[prev] if prev >= 0 else float(ref.final_alpha_cumprod))
    x, out = x.astype(np.float64), out.astype(np.float64)
    if pred == "epsilon":
        eps = out
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    else:  # v_prediction
        x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
        eps = np.sqrt(a_t) * out + np.sqrt(1 - a_t) * x
    sigma = np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps + sigma * noise


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("cfg,pred", CASES + [(dataclasses.replace(TRAILING, clip_sample=True, clip_sample_range=1.5),
                                               "epsilon")], ids=CASE_IDS + ["trailing-eps-clip"])
def test_ddim_matches_diffusers(cfg, pred, eta):
    n = 10
    ref, s = _ddim_ref(cfg, pred), make_schedule(cfg)
    ref.set_timesteps(n)
    ts = inference_timesteps(cfg, n)
    prev = ddim_prev_timesteps(ts, cfg.num_train_timesteps)
    outs = _outputs(n)
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(x), jnp.asarray(x)
    key = _key(3)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        k = jax.random.fold_in(key, i)
        noise = torch.from_numpy(np.array(jax.random.normal(k, SHAPE, jnp.float32))) if eta > 0 else None
        x_ref = ref.step(torch.from_numpy(outs[i]), t, x_ref, eta=eta, variance_noise=noise).prev_sample
        x_ours = _ddim_jit(s, jnp.asarray(outs[i]), jnp.int32(ts[i]), jnp.int32(prev[i]), x_ours, k,
                           prediction_type=pred, eta=eta, clip=cfg.clip_range)
        assert np.isfinite(np.asarray(x_ours)).all(), (i, int(t))
        # eta = 1 where abar_999 ~ 0 (zero terminal SNR; cosine 2.4e-9): the direction's radicand
        # 1 - abar_prev - sigma^2 is 0 at t = 999 up to float32 rounding, whose sign depends on the
        # CPU's arithmetic (FMA or not). Positive residue (up to ~6e-8 -> 2.4e-4 after the sqrt): both
        # agree within the wider tolerance. Negative: diffusers takes sqrt(< 0) and its whole sample
        # is NaN, where ours clamps to 0; the reference then continues from our sample.
        # Only that first step gets the wider tolerance; the reference then continues from our sample,
        # so every later step is compared on its own at the usual one.
        near_zero_snr = float(s.alphas_cumprod[-1]) < 1e-6 and eta == 1.0
        if near_zero_snr and i == 0:
            if bool(torch.isnan(x_ref).all()):
                radicand = 1.0 - float(ref.alphas_cumprod[int(prev[i])]) - float(ref._get_variance(t, int(prev[i])))
                assert -1e-6 < radicand <= 0.0, radicand  # diffusers' own float32 terms: rounding residue only
                expect = _ddim_step_float64(ref, outs[i], int(t), int(prev[i]), x, noise.numpy(), pred)
            else:
                expect = x_ref.numpy()
            diff = float(np.abs(np.asarray(x_ours) - expect).max())
            assert diff <= 50 * _tol(expect), (i, int(t), diff)
            x_ref = torch.from_numpy(np.array(x_ours))
            continue
        diff = float(np.abs(np.asarray(x_ours) - x_ref.numpy()).max())
        tol = _tol(x_ref.numpy())
        assert diff <= tol, (i, int(t), diff)
        worst = max(worst, diff / max(1.0, float(x_ref.abs().max())))
    print(f"ddim {pred} eta={eta}: max rel-ish diff {worst:.2e}")


@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize("cfg,pred", CASES, ids=CASE_IDS)
def test_dpmpp_2m_matches_diffusers(cfg, pred, n):
    ref, s = _dpm_ref(cfg, pred), make_schedule(cfg)
    ref.set_timesteps(n)
    ts = jnp.asarray(inference_timesteps(cfg, n, "dpmpp_2m"))
    outs = _outputs(n, seed=4)
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(x), jnp.asarray(x)
    state = dpm_init_state(x_ours)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(outs[i]), t, x_ref).prev_sample
        x_ours, state = _dpm_jit(s, state, jnp.asarray(outs[i]), jnp.int32(i), ts, x_ours, prediction_type=pred)
        diff = float(np.abs(np.asarray(x_ours) - x_ref.numpy()).max())
        assert diff <= _tol(x_ref.numpy()), (i, int(t), diff)
        worst = max(worst, diff / max(1.0, float(x_ref.abs().max())))
    assert int(state.steps_taken) == n
    print(f"dpm++2m {pred} n={n}: max rel-ish diff {worst:.2e}")


def test_dpmpp_2m_img2img_tail_matches_diffusers_begin_index():
    """A fresh solve over a tail of the schedule == diffusers with set_begin_index (img2img)."""
    cfg, pred, n, begin = SD, "epsilon", 10, 4
    ref, s = _dpm_ref(cfg, pred), make_schedule(cfg)
    ref.set_timesteps(n)
    ref.set_begin_index(begin)
    ts = jnp.asarray(inference_timesteps(cfg, n, "dpmpp_2m")[begin:])
    outs = _outputs(n - begin, seed=10)
    x = np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(x), jnp.asarray(x)
    state = dpm_init_state(x_ours)
    for i, t in enumerate(ref.timesteps[begin:]):
        x_ref = ref.step(torch.from_numpy(outs[i]), t, x_ref).prev_sample
        x_ours, state = _dpm_jit(s, state, jnp.asarray(outs[i]), jnp.int32(i), ts, x_ours, prediction_type=pred)
        assert float(np.abs(np.asarray(x_ours) - x_ref.numpy()).max()) <= _tol(x_ref.numpy())


def test_ddim_per_set_timesteps_and_final_alpha():
    """t (B,) differs per set; t_prev < 0 uses final_alpha_cumprod (set_alpha_to_one)."""
    s = make_schedule(TRAILING)
    rng = np.random.default_rng(6)
    x, out = (jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32)) for _ in range(2))
    t, t_prev = jnp.array([999, 19]), jnp.array([899, -1])
    both = ddim_step(s, out, t, t_prev, x, prediction_type="epsilon")
    for b in range(2):
        one = ddim_step(s, out[b:b + 1], t[b], t_prev[b], x[b:b + 1], prediction_type="epsilon")
        np.testing.assert_allclose(np.asarray(both[b:b + 1]), np.asarray(one), atol=1e-6)
    x0, _ = predict_x0_eps(s, x, out, t, "epsilon")  # abar_prev = 1: the last step returns x0
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(x0[1]), atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        ddim_step(s, out, t, t_prev, x, prediction_type="epsilon", eta=0.5)


# ----------------------------------------------------------------------------- fori_loop sampler


def _denoise(outs):
    outs = jnp.asarray(outs)
    return lambda x, t, i: outs[i] + 0.1 * x * jnp.cos(t.astype(jnp.float32) / 100.0)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_fori_loop_equals_python_loop_and_diffusers(sampler, eta):
    cfg, pred, n = SD, "v_prediction", 6
    s, outs = make_schedule(cfg), _outputs(n, seed=7)
    denoise = _denoise(outs)
    ts = inference_timesteps(cfg, n, sampler)
    x_T = jnp.asarray(np.random.default_rng(8).standard_normal(SHAPE).astype(np.float32))
    key = _key(9)
    loop = jax.jit(lambda x: sample_loop(denoise, x, ts, s, sampler=sampler, prediction_type=pred, eta=eta,
                                         key=key if eta > 0 else None))
    got = np.asarray(loop(x_T))

    # python loop over the same step functions
    x, state, prev = x_T, dpm_init_state(x_T), ddim_prev_timesteps(ts, cfg.num_train_timesteps)
    ref = _ddim_ref(cfg, pred) if sampler == "ddim" else _dpm_ref(cfg, pred)
    ref.set_timesteps(n)
    x_ref = torch.from_numpy(np.asarray(x_T))
    for i in range(n):
        t = jnp.int32(ts[i])
        out = denoise(x, t, jnp.int32(i))
        out_ref = denoise(jnp.asarray(x_ref.numpy()), t, jnp.int32(i))
        if sampler == "ddim":
            k = jax.random.fold_in(key, i)
            x = _ddim_jit(s, out, t, jnp.int32(prev[i]), x, k, prediction_type=pred, eta=eta)
            noise = torch.from_numpy(np.array(jax.random.normal(k, SHAPE, jnp.float32))) if eta > 0 else None
            x_ref = ref.step(torch.from_numpy(np.asarray(out_ref)), ref.timesteps[i], x_ref, eta=eta,
                             variance_noise=noise).prev_sample
        else:
            x, state = _dpm_jit(s, state, out, jnp.int32(i), jnp.asarray(ts), x, prediction_type=pred)
            x_ref = ref.step(torch.from_numpy(np.asarray(out_ref)), ref.timesteps[i], x_ref).prev_sample
    np.testing.assert_allclose(got, np.asarray(x), atol=1e-5)
    diff = float(np.abs(got - x_ref.numpy()).max())
    assert diff <= _tol(x_ref.numpy()), diff
    print(f"sample_loop {sampler} eta={eta}: vs python loop {np.abs(got - np.asarray(x)).max():.2e}, "
          f"vs diffusers {diff:.2e}")


def test_sample_loop_argument_errors():
    s, x = make_schedule(SD), jnp.zeros(SHAPE)
    ts = inference_timesteps(SD, 4)
    with pytest.raises(ValueError, match="key"):
        sample_loop(_denoise(_outputs(4)), x, ts, s, eta=1.0)
    with pytest.raises(ValueError, match="sampler"):
        sample_loop(_denoise(_outputs(4)), x, ts, s, sampler="euler")
