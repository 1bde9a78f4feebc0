"""The joint sampler: inpaint the unknown members of a set from the known ones (JeDi, Sec. 3.3-3.4).

A set of static size N holds k references (known) and m targets (generated), padded with a member
mask, so one compiled program serves every k <= N - m. References enter through the 9-channel
input (jedi_inputs.unet_input). In "replace" mode the noisy channel of every reference is, at each
step, the reference noised to the current timestep (as in training); at the end the references
come out exactly equal to their latents.

The whole loop runs under one jax.jit with lax.fori_loop (schedulers.loop.sample_loop); parameters
are arguments, and guidance scales are traced values (changing them does not recompile).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jedi_jax.models.jedi_inputs import unet_input
from jedi_jax.sampling import guidance
from jedi_jax.schedulers.loop import sample_loop
from jedi_jax.schedulers.schedule import SAMPLERS, add_noise

# unet_fn(params, latents (B, N, h, w, Cin), timesteps (B,), context (B, N, T, D), member_mask (B, N))
#   -> model output (B, N, h, w, C)
UNetFn = Callable[..., jnp.ndarray]


@struct.dataclass
class JointSamplerConfig:
    """Static settings of one compiled sampling program."""

    sampler: str = struct.field(pytree_node=False, default="ddim")
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    # True (JeDi's inference): the known members' noisy channel is their clean latents re-noised to
    # each step's level. False (an experiment, not the paper's): they are denoised like the targets,
    # along the guided output, whose no-reference branches computed their rows with the references
    # themselves masked out; nothing trained the model for those rows.
    replace_known: bool = struct.field(pytree_node=False, default=True)
    # False: plain classifier-free text guidance in 2 branches (for sets without references).
    image_guidance: bool = struct.field(pytree_node=False, default=True)
    # Which guidance term conditions on the other (guidance.py): "image_first" or "text_first".
    guidance_order: str = struct.field(pytree_node=False, default="image_first")
    # DDIM's x0 clip range (the scheduler's clip_sample / clip_sample_range) or None; dpmpp_2m ignores it,
    # as diffusers' DPMSolverMultistepScheduler has no clip_sample.
    clip_sample: float | None = struct.field(pytree_node=False, default=None)


def guided_output(unet_fn: UNetFn, unet_params, x_t, t, ref_latents, layout: guidance.SetLayout,
                  context_text, context_empty, image_scale, text_scale, image_guidance: bool = True,
                  part_contexts=None, part_weights=None, order: str = "image_first"):
    """One batched UNet call over all guidance branches (G = 3, or 2 without image guidance; one
    more per extra part of composed prompts: part_contexts (P, B, N, T, D), part_weights (P, B, N))
    -> guided output (B, N, h, w, C)."""
    if (part_contexts is None) != (part_weights is None):
        raise ValueError("composed prompts need both part_contexts and part_weights (or neither)")
    num_parts = 1 if part_contexts is None else part_contexts.shape[0]
    g = guidance.num_branches(image_guidance, num_parts)
    member_mask, ref_mask, context = guidance.branch_inputs(layout, context_text, context_empty, image_guidance,
                                                            part_contexts, order)
    x_g = jnp.concatenate([x_t] * g, axis=0)  # (G*B, N, h, w, C)
    refs_g = jnp.concatenate([ref_latents] * g, axis=0)  # (G*B, N, h, w, C)
    model_in = unet_input(x_g, refs_g, ref_mask)  # (G*B, N, h, w, 2C+1)
    t_g = jnp.full((g * x_t.shape[0],), t, dtype=jnp.int32)  # (G*B,)
    out = unet_fn(unet_params, model_in, t_g, context, member_mask)  # (G*B, N, h, w, C)
    return guidance.combine(out.astype(jnp.float32), image_scale, text_scale, image_guidance, part_weights, order)


def step_scale(scale, i):
    """A guidance scale at step i: `scale` is one value () or one per step (S,) (guidance intervals)."""
    scale = jnp.asarray(scale, jnp.float32)
    return scale[i] if scale.ndim == 1 else scale


def sample_set(unet_fn: UNetFn, unet_params, schedule, timesteps: jnp.ndarray, x_T: jnp.ndarray,
               ref_latents: jnp.ndarray, layout: guidance.SetLayout, context_text: jnp.ndarray,
               context_empty: jnp.ndarray, image_scale, text_scale, key: jax.Array, *,
               config: JointSamplerConfig, eta: float = 0.0,
               on_step: Callable[[jnp.ndarray], None] | None = None,
               part_contexts: jnp.ndarray | None = None, part_weights: jnp.ndarray | None = None,
               references_on: jnp.ndarray | None = None) -> jnp.ndarray:
    """Denoises a padded set; returns clean latents (B, N, h, w, C).

    timesteps: (S,) int, descending (the scheduler's inference timesteps).
    x_T:       (B, N, h, w, C) initial noise.
    ref_latents: (B, N, h, w, C) clean latents of the references (anything where not a reference).
    key:       PRNG key, split into the DDIM eta noise stream and the reference re-noising stream;
               step i uses fold_in(stream, i).
    image_scale, text_scale: () or (S,) per step (step_scale); traced, so new values never recompile.
    on_step:   optional host callback called with the step index after each step (progress bars).
    part_contexts, part_weights: composed prompts (guidance.py): (P, B, N, T, D) and (P, B, N).

    The loop itself is `schedulers.loop.sample_loop`; this function supplies the guided set
    denoiser and, in replace mode, the re-noising of the known members as its `pre_step`.
    """
    if config.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {config.sampler!r}; choose one of {SAMPLERS}")
    for name, scale in (("image_scale", image_scale), ("text_scale", text_scale)):
        # a per-step scale of another length would be read with a clamped index, silently
        if jnp.ndim(scale) > 1 or (jnp.ndim(scale) == 1 and jnp.shape(scale) != timesteps.shape):
            raise ValueError(f"{name} must be one value () or one per step {tuple(timesteps.shape)}; "
                             f"got shape {jnp.shape(scale)}")
    # a reference flagged on a padding slot is padding (as in training, train/step.py): otherwise it
    # would be re-noised and returned as known while every branch's attention masks it out
    layout = guidance.SetLayout(member_mask=layout.member_mask, ref_mask=layout.ref_mask & layout.member_mask)
    known = layout.ref_mask[:, :, None, None, None]  # (B, N, 1, 1, 1)
    eta_key, known_key = jax.random.split(key)

    def renoise_known(x, t, i):  # the references noised to t, as in training
        noise = jax.random.normal(jax.random.fold_in(known_key, i), x.shape, x.dtype)
        noised = add_noise(schedule, ref_latents, noise, jnp.full((x.shape[0],), t)).astype(x.dtype)
        return jnp.where(known, noised, x)  # x's dtype: the loop's carry must keep it

    def denoise_with_references(x, t, i):
        s_i = step_scale(image_scale, i)
        s_t = step_scale(text_scale, i)
        return guided_output(unet_fn, unet_params, x, t, ref_latents, layout, context_text, context_empty,
                             s_i, s_t, config.image_guidance, part_contexts, part_weights, config.guidance_order)

    if references_on is None:
        denoise = denoise_with_references
    else:
        # The reference-free step: the same set with its references removed (targets only), 2 text branches.
        targets_only = guidance.SetLayout(member_mask=layout.target_mask, ref_mask=jnp.zeros_like(layout.ref_mask))

        def denoise_without_references(x, t, i):
            return guided_output(unet_fn, unet_params, x, t, ref_latents, targets_only, context_text, context_empty,
                                 0.0, step_scale(text_scale, i), False, part_contexts, part_weights)

        references_on = jnp.asarray(references_on, bool)  # (S,)
        if references_on.shape != timesteps.shape:
            raise ValueError(f"references_on has shape {references_on.shape}; expected one flag per step "
                             f"{tuple(timesteps.shape)}")
        if not config.image_guidance:
            raise ValueError("references_on needs image guidance (a set with references)")

        def denoise(x, t, i):  # one branch runs per step; both are compiled once
            return jax.lax.cond(references_on[i], denoise_with_references, denoise_without_references, x, t, i)

    x = sample_loop(denoise, x_T, timesteps, schedule, sampler=config.sampler,
                    prediction_type=config.prediction_type, eta=eta, key=eta_key,
                    clip_sample=config.clip_sample if config.sampler == "ddim" else None,
                    pre_step=renoise_known if config.replace_known else None, on_step=on_step)
    if config.replace_known:
        x = jnp.where(known, ref_latents.astype(x.dtype), x)
    return x
