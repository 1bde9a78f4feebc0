"""The JeDi train step: one jitted, sharded, donated, ahead-of-time compiled function.

Loss (JeDi, Zeng et al., CVPR 2024, Sec. 3): a set of N images of one subject is a single sample
of the joint distribution; the UNet (coupled self-attention across the set) denoises all members
at ONE diffusion time t per set. Personalization is inpainting of the set: a random subset of
members are references (known), given clean through the 9-channel input
(`jedi_inputs.unet_input`: [x_t | known-mask | clean reference latents]); the others are
generated. The denoising loss (epsilon or v, Ho et al. 2020 / Salimans & Ho 2022) is averaged
over the GENERATED members only -- references and padding members carry no loss:

    x0     = scale(VAE.encode(images))                 (B, N, h, w, C)   (or batch['latents'])
    t      ~ U{0..T-1}                                 (B,)   one per set
    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    pred   = UNet([x_t | ref | x0 * ref], t, CLIP(captions), member_mask)
    w      = member_mask & ~ref_mask                    (B, N)
    l      = mean_{h,w,c} (pred - target)^2             (B, N)
    loss   = sum_{b,n} w l / sum w                      loss_weighting="member" (every generated image
                                                        weighs the same)
    loss   = mean over sets with sum_n w > 0 of sum_n w l / sum_n w
                                                        loss_weighting="set" (every set weighs the same)

With k ~ U{0..N-1} references, "member" gives a set with k=0 N times the weight of one with
k=N-1 (it has N generated members against 1), so the many-reference case that personalization
with several references needs is the one least trained; "set" gives every k the same weight.
With train.grad_accum > 1 both normalizations are per micro-batch (optax.MultiSteps then averages
the micro-batches' gradients): a micro-batch with few generated members weighs as much as one
with many, so "member" is exact only within a micro-batch.

Subject weighting (train.subject_weight = a > 0; needs subject masks in the batch): within a member
the squared error is a weighted mean over the latent grid,

    m      = avg_pool(subject mask)                     (B, N, h, w)  fraction of subject pixels per cell
    l      = sum_{h,w} (1 + a m) mean_c (pred - target)^2 / sum_{h,w} (1 + a m)

so each member's loss keeps its scale while the subject's cells count 1 + a times a background cell.
Why: identity (palette, texture, marks) lives in the subject's pixels, which are a small share of an
image whose background the caption already names; an unweighted mean spends most of the gradient on
the background.

The weight may depend on the set's timestep (train.subject_weight_high_noise = b >= 0): a(t) = a for
t < train.high_noise_from_t and b from there on. Why: the layout (background, placement) is decided at
high noise (EXPERIMENTS.md, experiments 5 and 16), identity detail at lower noise; a heavier subject
weight everywhere bought identity and cost composition (experiment 19), so the two halves of the
schedule can be weighted apart.

PRNG: the step's key is `fold_in(base_key, state.step)`, so a resumed run draws exactly the
noise of an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jedi_jax.models.jedi_inputs import unet_input
from jedi_jax.schedulers.schedule import NoiseSchedule, add_noise, v_target
from jedi_jax.train import state as state_lib
from jedi_jax.train.models import Models

log = logging.getLogger(__name__)

BATCH_KEYS = ("images", "latents", "input_ids", "member_mask", "ref_mask", "masks")

# Dense bf16 peak FLOP/s per chip (no sparsity), matched by substring of `device.device_kind`, first
# match wins: more specific names come before the names they contain ("L40S" before "L40" before "L4").
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_chip(device=None) -> float | None:
    """Peak bf16 FLOP/s of one chip, or None when unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def select_batch(batch: dict) -> dict:
    """The arrays the step consumes (images OR latents, input_ids, member_mask, ref_mask; subject masks
    when the loader emits them, i.e. when the loss weights the subject)."""
    out = {k: batch[k] for k in BATCH_KEYS if k in batch}
    if "latents" in out:
        out.pop("images", None)
    missing = [k for k in ("input_ids", "member_mask", "ref_mask") if k not in out]
    if missing or not ({"images", "latents"} & out.keys()):
        raise KeyError(f"batch lacks {missing or ['images or latents']} (has {sorted(batch)})")
    return out


LOSS_WEIGHTINGS = ("member", "set")


def configured_subject_weight(config) -> float:
    """config.train.subject_weight (0 for configs saved before the option existed)."""
    return float(config.train.get("subject_weight", 0.0))


def configured_subject_weight_by_t(config, num_train_timesteps: int) -> float | np.ndarray:
    """The subject weight a(t) the step uses: the float train.subject_weight when it is the same at
    every t, else a (T,) float32 table, a for t < train.high_noise_from_t and
    train.subject_weight_high_noise from there on (module docstring). Configs saved before these keys
    existed read as a constant weight."""
    a = configured_subject_weight(config)
    b = float(config.train.get("subject_weight_high_noise", -1.0))
    if b < 0:
        return a
    t0 = int(config.train.get("high_noise_from_t", num_train_timesteps))
    return np.where(np.arange(num_train_timesteps) < t0, a, b).astype(np.float32)  # (T,)


def uses_subject_weight(subject_weight: float | np.ndarray) -> bool:
    """Whether the loss reads subject masks: some timestep weighs the subject (a(t) > 0)."""
    return bool(np.any(np.asarray(subject_weight) > 0))


def configured_uses_subject_weight(config) -> bool:
    """Whether the configured loss reads subject masks (so the loader must emit them)."""
    num_t = int((config.get("schedule") or {}).get("num_train_timesteps", 1000))
    return uses_subject_weight(configured_subject_weight_by_t(config, num_t))


def subject_weight_map(masks: jax.Array, subject_weight, latent_hw: tuple[int, int]) -> jax.Array:
    """1 + subject_weight * (fraction of subject pixels in each latent cell): (B, N, H, W) -> (B, N, h, w).

    masks: subject masks in [0, 1] at image resolution, H and W multiples of h and w (the VAE factor).
    subject_weight: a scalar, or (B,) one weight per set (a(t) at the set's timestep).
    """
    B, N, H, W = masks.shape
    h, w = latent_hw
    if H % h or W % w:
        raise ValueError(f"subject masks {H}x{W} do not pool to the {h}x{w} latent grid")
    frac = masks.astype(jnp.float32).reshape(B, N, h, H // h, w, W // w).mean(axis=(3, 5))  # (B, N, h, w)
    a = jnp.reshape(jnp.asarray(subject_weight, jnp.float32), (-1, 1, 1, 1))  # (B or 1, 1, 1, 1)
    return 1.0 + a * frac


def jedi_loss(models: Models, schedule: NoiseSchedule, prediction_type: str, unet_params, frozen: dict,
              batch: dict, key: jax.Array, loss_weighting: str = "member",
              subject_weight: float | np.ndarray = 0.0) -> tuple[jax.Array, dict]:
    """The JeDi denoising loss of one batch (see module docstring). Returns (loss, aux).

    subject_weight: a, the same at every timestep, or a (T,) table a(t) (`configured_subject_weight_by_t`).
    """
    member = batch["member_mask"].astype(bool)  # (B, N)
    ref = batch["ref_mask"].astype(bool) & member  # (B, N)
    B, N = member.shape
    k_t, k_noise, k_vae = jax.random.split(key, 3)

    if "latents" in batch:  # precomputed, already scaled
        x0 = batch["latents"].astype(jnp.float32)  # (B, N, h, w, C)
    else:
        images = batch["images"]  # (B, N, H, W, 3)
        flat = images.reshape((B * N,) + images.shape[2:])  # (B*N, H, W, 3)
        z = models.encode_images(frozen["vae"], flat, k_vae)  # (B*N, h, w, C)
        x0 = jax.lax.stop_gradient(z.reshape((B, N) + z.shape[1:]))  # (B, N, h, w, C)
    ids = batch["input_ids"]  # (B, N, T)
    ctx = models.encode_text(frozen["text_encoder"], ids.reshape(B * N, ids.shape[-1]))  # (B*N, T, D)
    ctx = jax.lax.stop_gradient(ctx.reshape((B, N) + ctx.shape[1:]))  # (B, N, T, D)

    cell_weight = None
    if uses_subject_weight(subject_weight):
        if "masks" not in batch:
            raise KeyError("train.subject_weight > 0 needs subject masks in the batch (a source whose records "
                           "have 'masks', loaded with with_masks=True)")
        masks, hw = batch["masks"], x0.shape[2:4]
        if np.ndim(subject_weight) == 0:
            cell_weight = subject_weight_map(masks, float(subject_weight), hw)  # (B, N, h, w)
        else:  # a(t): the weight is chosen once the set's timestep is drawn
            table = jnp.asarray(subject_weight, jnp.float32)  # (T,)
            cell_weight = lambda t: subject_weight_map(masks, table[t], hw)  # noqa: E731  (B,) -> (B, N, h, w)
    apply = lambda p, x, t, c, m: models.unet_apply(p, x, t, c, m)  # noqa: E731
    loss, num = latent_set_loss(apply, schedule, prediction_type, unet_params, x0, ctx, member, ref, k_t, k_noise,
                                loss_weighting, cell_weight)
    return loss, {"generated": num, "references": jnp.sum(ref.astype(jnp.float32))}


def latent_set_loss(unet_apply: Callable, schedule: NoiseSchedule, prediction_type: str, unet_params,
                    x0: jax.Array, ctx: jax.Array, member: jax.Array, ref: jax.Array, k_t: jax.Array,
                    k_noise: jax.Array, loss_weighting: str = "member",
                    cell_weight: jax.Array | Callable[[jax.Array], jax.Array] | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """The denoising loss of latent sets (JeDi section 3): one timestep per set, references clean
    in the 2C+1 input, the mean squared error over the generated members only, each generated member
    weighing the same (loss_weighting="member") or each set that has one (="set"; module docstring).

    unet_apply(params, x_in (B, N, h, w, 2C+1), t (B,), ctx (B, N, T, D), member (B, N)) -> (B, N, h, w, C).
    x0 (B, N, h, w, C) scaled latents; member / ref (B, N) bool; cell_weight (B, N, h, w), or a function
    of the sets' timesteps t (B,) giving it, or None: a weighted mean over the latent grid within each
    member (`subject_weight_map`), None = plain mean.
    Returns (loss, number of generated members).
    Also the DreamBooth baseline's loss (eval/dreambooth.py: sets of one, nothing known).
    """
    B = x0.shape[0]
    t = jax.random.randint(k_t, (B,), 0, schedule.num_train_timesteps)  # (B,) one time per set
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)  # (B, N, h, w, C)
    noisy = add_noise(schedule, x0, noise, t)  # t (B,) broadcasts over (N, h, w, C)
    x_in = unet_input(noisy, x0, ref)  # (B, N, h, w, 2C+1)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = v_target(schedule, x0, noise, t)
    else:
        raise ValueError(f"prediction_type={prediction_type!r}: use 'epsilon' or 'v_prediction'")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting={loss_weighting!r}: use one of {LOSS_WEIGHTINGS}")

    pred = unet_apply(unet_params, x_in, t, ctx, member)  # (B, N, h, w, C)
    sq = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)  # (B, N, h, w)
    if callable(cell_weight):
        cell_weight = cell_weight(t)  # (B, N, h, w)
    if cell_weight is None:
        per_member = jnp.mean(sq, axis=(2, 3))  # (B, N)
    else:
        per_member = jnp.sum(sq * cell_weight, axis=(2, 3)) / jnp.sum(cell_weight, axis=(2, 3))  # (B, N)
    weight = (member & ~ref).astype(jnp.float32)  # (B, N): generated members only
    num = jnp.sum(weight)
    if loss_weighting == "member":
        return jnp.sum(per_member * weight) / jnp.maximum(num, 1.0), num
    per_set_num = jnp.sum(weight, axis=1)  # (B,)
    per_set = jnp.sum(per_member * weight, axis=1) / jnp.maximum(per_set_num, 1.0)  # (B,)
    has_generated = (per_set_num > 0).astype(jnp.float32)  # (B,) a set of references only carries no loss
    return jnp.sum(per_set * has_generated) / jnp.maximum(jnp.sum(has_generated), 1.0), num


def make_train_step(models: Models, schedule: NoiseSchedule, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, *, prediction_type: str, ema_decay: float,
                    loss_weighting: str = "member", subject_weight: float | np.ndarray = 0.0) -> Callable:
    """(state, batch, frozen, base_key) -> (state, metrics). Pure; jit it with `compile_train_step`.

    base_key: uint32 key data (`jax.random.key_data(jax.random.key(seed))`), replicated.
    """

    def train_step(state: state_lib.TrainState, batch: dict, frozen: dict, base_key: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(base_key), state.step)
        loss_fn = lambda p: jedi_loss(models, schedule, prediction_type, p, frozen, batch, key,  # noqa: E731
                                      loss_weighting, subject_weight)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        lr = lr_schedule(state_lib.optimizer_updates(tx, state.opt_state, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = state_lib.ema_update(ema, params, ema_decay, state_lib.did_update(tx, opt_state))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": jnp.asarray(lr, jnp.float32), **aux}
        return new_state, metrics

    return train_step


def configured_train_step(config, models: Models, schedule: NoiseSchedule, tx: optax.GradientTransformation,
                          lr_schedule: optax.Schedule) -> Callable:
    """`make_train_step` with the loss settings of a training config (the trainer's and the bench's)."""
    return make_train_step(models, schedule, tx, lr_schedule, prediction_type=config.schedule.prediction_type,
                           ema_decay=float(config.train.ema_decay), loss_weighting=config.train.loss_weighting,
                           subject_weight=configured_subject_weight_by_t(config, schedule.num_train_timesteps))


def compile_train_step(train_step: Callable, *, abstract_state, state_shardings, abstract_batch: dict,
                       batch_sharding, abstract_frozen, frozen_shardings, mesh,
                       flops_train_step: Callable | None = None) -> tuple[Any, dict]:
    """jax.jit with explicit in/out shardings and a donated state, lowered and compiled now.

    abstract_*: ShapeDtypeStruct trees (GLOBAL shapes). Returns (compiled, info) where info has
    'compile_s' and 'flops' (per device per step, from XLA's cost analysis; None if unavailable).

    flops_train_step: the same step with the "xla" attention kernel, for counting FLOPs only. XLA's
    cost analysis counts a scan body once (the "chunked" kernel's FLOPs come out divided by its
    number of chunks) and a custom call (cuDNN attention) as nothing, while attention is about a third
    of an SD 1.5 step. It is lowered, not compiled, and its (global) count divided by the mesh size.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    rep = NamedSharding(mesh, P())
    batch_sh = {k: batch_sharding for k in abstract_batch}
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh, frozen_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    key_spec = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # (2,) uint32 for threefry
    t0 = time.perf_counter()
    lowered = jitted.lower(abstract_state, abstract_batch, abstract_frozen, key_spec)
    compiled = lowered.compile()
    info = {"compile_s": time.perf_counter() - t0, "flops": step_flops(compiled), "flops_from": "compiled step"}
    if flops_train_step is not None:
        counted = jax.jit(flops_train_step, in_shardings=(state_shardings, batch_sh, frozen_shardings, rep),
                          out_shardings=(state_shardings, rep))
        total = step_flops(counted.lower(abstract_state, abstract_batch, abstract_frozen, key_spec))
        info.update(flops=None if total is None else total / mesh.size,
                    flops_from="the step lowered with the xla attention kernel")
    return compiled, info


def step_flops(compiled) -> float | None:
    """FLOPs of one step from XLA's cost analysis: per device for a compiled (partitioned) program,
    in all for a lowered one."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def abstract_batch(local_batch: dict, process_count: int) -> dict:
    """Global ShapeDtypeStructs of a batch whose process-local leading dim is B / process_count."""
    return {k: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + tuple(v.shape[1:]), v.dtype)
            for k, v in local_batch.items()}
