"""Sample grids during training: the joint sampler on sets from the training batch.

The trainer calls `sample_grid` every `sample.every` steps. For the first `sample.num_sets` sets of
the batch it keeps the batch's references (ref_mask) and captions, regenerates every other member
from its caption with the joint sampler (image + text guidance), and writes

    WORKDIR/samples/step_000500.png   per set: the real members (references marked), then the
                                      generated members (references come back unchanged)
    WORKDIR/samples/metrics.jsonl     {"step", "mse_to_truth"}: mean squared pixel error ([-1, 1])
                                      between generated members and the real ones, a cheap curve of
                                      how well identity + context are learned (real metric: MiniBench)
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jedi_jax.models.vae import scale_latents, unscale_latents
from jedi_jax.sampling import guidance
from jedi_jax.sampling.images import from_model_range, labeled_grid
from jedi_jax.sampling.joint import JointSamplerConfig, sample_set
from jedi_jax.schedulers.schedule import NoiseScheduleConfig, inference_timesteps, make_schedule


_PROGRAMS: dict = {}  # (id(models), schedule config, steps) -> jitted _generate (models hold no arrays)


def _program(models, schedule_cfg, num_steps):
    key = (id(models), schedule_cfg, num_steps)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(_generate, models, schedule_cfg, num_steps))
    return _PROGRAMS[key]


def _generate(models, schedule_cfg, num_steps, unet_params, frozen, images, latents, input_ids, empty_ids,
              member_mask, ref_mask, image_scale, text_scale, key):
    """images (B, N, H, W, 3) in [-1, 1], or their scaled latents (B, N, h', w', C) when `images` is
    None -> (the real set, the set with non-references regenerated), both (B, N, H, W, 3)."""
    b, n = member_mask.shape
    t = input_ids.shape[-1]
    context = models.encode_text(frozen["text_encoder"], input_ids.reshape(b * n, t)).reshape(b, n, t, -1)
    empty = models.encode_text(frozen["text_encoder"], empty_ids)  # (1, T, D)
    vae = models.vae.bind(frozen["vae"])

    def decode(z):  # (B, N, h', w', C) -> (B, N, H, W, 3)
        x = vae.decode(unscale_latents(z, models.vae_config).reshape((b * n,) + z.shape[2:]))
        return x.reshape((b, n) + x.shape[1:]).astype(jnp.float32)

    if images is not None:
        mean, _ = vae.encode(images.reshape((b * n,) + images.shape[2:]))
        latents = scale_latents(mean.astype(jnp.float32), models.vae_config)
        latents = latents.reshape((b, n) + latents.shape[1:])  # (B, N, h', w', C)
    schedule = make_schedule(schedule_cfg)
    timesteps = jnp.asarray(inference_timesteps(schedule_cfg, num_steps, "ddim"), jnp.int32)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), latents.shape, jnp.float32)
    out = sample_set(models.unet_apply, unet_params, schedule, timesteps, x_T, latents,
                     guidance.SetLayout(member_mask=member_mask, ref_mask=ref_mask), context,
                     jnp.broadcast_to(empty[None], context.shape), image_scale, text_scale,
                     jax.random.fold_in(key, 1),
                     config=JointSamplerConfig(prediction_type=schedule_cfg.prediction_type,
                                               clip_sample=schedule_cfg.clip_range))  # as the exported pipeline
    return (images if images is not None else decode(latents)), decode(out)


def sample_grid(*, step, workdir, config, models, unet_params, frozen, batch, tokenizer, mesh):
    """Writes the sample grid of `step`; returns its path (process 0) or None. `batch` is this
    process's numpy batch (its references and captions are personalized from); `unet_params` are the
    EMA params when `sample.use_ema`."""
    k = min(int(config.sample.num_sets), batch["member_mask"].shape[0])
    keys = ("images" if "images" in batch else "latents", "input_ids", "member_mask", "ref_mask")
    sets = {name: np.asarray(batch[name][:k]) for name in keys}
    if jax.process_count() > 1:
        # The program takes these as replicated values next to the globally sharded params: every
        # process must pass the same ones, and each loaded its own slice of the batch. Process 0's.
        from jax.experimental import multihost_utils

        sets = multihost_utils.broadcast_one_to_all(sets)
    images = jnp.asarray(sets["images"]) if "images" in sets else None
    latents = jnp.asarray(sets["latents"]) if images is None else None
    member_mask = jnp.asarray(sets["member_mask"])
    ref_mask = jnp.asarray(sets["ref_mask"])
    schedule_cfg = NoiseScheduleConfig.from_train_config(config.schedule.to_dict())
    empty_ids = jnp.asarray(tokenizer([""]))  # (1, T)
    real, out = _program(models, schedule_cfg, int(config.sample.num_steps))(
                    unet_params, frozen, images, latents, jnp.asarray(sets["input_ids"]), empty_ids, member_mask, ref_mask,
                    jnp.float32(config.sample.get("image_guidance_scale", 2.0)),
                    jnp.float32(config.sample.guidance_scale), jax.random.fold_in(jax.random.key(config.seed), step))
    out, real = np.asarray(out), np.asarray(real)
    generated = np.asarray(member_mask & ~ref_mask)
    mse = float(((out - real) ** 2).mean(axis=(2, 3, 4))[generated].mean()) if generated.any() else float("nan")
    if jax.process_index() != 0:
        return None
    rows, labels = [], []
    for i in range(k):
        valid = np.flatnonzero(np.asarray(member_mask[i]))
        rows += [[from_model_range(real[i, j]) for j in valid], [from_model_range(out[i, j]) for j in valid]]
        labels += [["reference" if ref_mask[i, j] else "real" for j in valid],
                   ["(given)" if ref_mask[i, j] else "generated" for j in valid]]
    folder = Path(workdir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{int(step):06d}.png"
    labeled_grid(rows, labels, cell=96).save(path)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": int(step), "mse_to_truth": mse}) + "\n")
    return path
