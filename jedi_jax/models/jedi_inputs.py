"""The JeDi UNet input layout: one definition shared by training and sampling (JeDi, Sec. 3.3).

Personalization is inpainting of a set: known members (the references) are given clean, unknown
members are generated. The UNet sees, per member, 2C+1 channels (9 for C=4 latents: the channel
count and order of SD inpainting, whose mask means the opposite: 1 = the region to generate there,
1 = a known member here):

    [ noisy latent x_t (C) | known-mask (1) | clean reference latent, zeros where unknown (C) ]

The noisy channel holds x_t for every member (references included, noised to the same t), so a
model trained this way can also be sampled in "replacement" mode.
"""
from __future__ import annotations

import jax.numpy as jnp


def unet_input(noisy: jnp.ndarray, ref_latents: jnp.ndarray, ref_mask: jnp.ndarray) -> jnp.ndarray:
    """noisy, ref_latents (B, N, h, w, C); ref_mask (B, N) bool -> (B, N, h, w, 2C+1)."""
    known = ref_mask.astype(noisy.dtype)[:, :, None, None, None]  # (B, N, 1, 1, 1)
    mask_channel = jnp.broadcast_to(known, noisy.shape[:-1] + (1,))  # (B, N, h, w, 1)
    # where, not ref_latents * known: 0 * NaN is NaN, and the unknown members are the ones generated
    refs = jnp.where(ref_mask[:, :, None, None, None], ref_latents, 0).astype(noisy.dtype)  # (B, N, h, w, C)
    return jnp.concatenate([noisy, mask_channel, refs], axis=-1)


def num_input_channels(latent_channels: int) -> int:
    return 2 * latent_channels + 1


def check_compatible(unet_config, vae_config, text_config) -> None:
    """The sizes that must agree for JeDi (training and sampling; raises ValueError naming both sides)."""
    c = vae_config.latent_channels
    if unet_config.in_channels != num_input_channels(c):
        raise ValueError(f"unet.in_channels={unet_config.in_channels} must be 2*latent_channels+1="
                         f"{num_input_channels(c)} (JeDi input: noisy | known-mask | reference latents)")
    if unet_config.out_channels != c:
        raise ValueError(f"unet.out_channels={unet_config.out_channels} must equal vae.latent_channels={c}")
    bad = [d for d in unet_config.cross_attention_dim if d != text_config.hidden_size]
    if bad:
        raise ValueError(f"unet.cross_attention_dim={unet_config.cross_attention_dim} must equal "
                         f"text_encoder.hidden_size={text_config.hidden_size}")


def widen_conv_in(unet_params: dict, in_channels: int) -> dict:
    """Widens the UNet's conv_in kernel (3, 3, C_old, C_out) to `in_channels` input channels.

    The new channels get zero weights, so a converted text-to-image model (4 channels) computes
    exactly what it did before, whatever the known-mask and reference channels hold: training then
    learns to use them (JeDi initializes from SD this way). Returns a new params dict (`unet_params`
    itself when it already has `in_channels`).
    """
    kernel = unet_params["conv_in"]["kernel"]  # (3, 3, C_old, C_out)
    old = kernel.shape[2]
    if in_channels < old:
        raise ValueError(f"cannot narrow conv_in from {old} to {in_channels} input channels")
    if in_channels == old:
        return unet_params
    pad = jnp.zeros(kernel.shape[:2] + (in_channels - old,) + kernel.shape[3:], kernel.dtype)
    widened = jnp.concatenate([jnp.asarray(kernel), pad], axis=2)  # (3, 3, in_channels, C_out)
    return {**unet_params, "conv_in": {**unet_params["conv_in"], "kernel": widened}}
