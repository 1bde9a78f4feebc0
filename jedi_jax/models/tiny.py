"""Tiny SD-layout configs and random-weight model folders, for tests, benchmarks and smoke runs.

Same code paths as the full Stable Diffusion model (UNet with the 9-channel JeDi input and coupled
attention, AutoencoderKL, CLIP text encoder, CLIP BPE tokenizer), just small, so that everything
downstream (conversion, sampling, training) can be exercised on a CPU in seconds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jedi_jax.convert.pipeline_folder import write_model_folder
from jedi_jax.models.clip_text import CLIPTextConfig
from jedi_jax.models.functional import Functional
from jedi_jax.models.jedi_inputs import num_input_channels
from jedi_jax.models.unet import UNetConfig
from jedi_jax.models.vae import VAEConfig
from jedi_jax.convert import components as comp

TINY_WORDS = ("a", "photo", "of", "the", "dog", "cat", "ball", "on", "beach", "grass", "snow", "red", "blue", "in")

# The scheduler of Stable Diffusion 1.x (diffusers scheduler_config.json).
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def tiny_configs(*, resolution: int = 32, latent_channels: int = 4, jedi: bool = True, cross_dim: int = 32,
                 vocab_size: int = 1000, max_length: int = 16) -> dict:
    """{"unet", "vae", "text_encoder"} configs: VAE /4, 2-level UNet with attention at both levels."""
    vae = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=latent_channels,
                    norm_num_groups=8, sample_size=resolution)
    unet = UNetConfig(in_channels=num_input_channels(latent_channels) if jedi else latent_channels,
                      out_channels=latent_channels, block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                      transformer_layers_per_block=(1, 1), num_heads=(2, 4), cross_attention_dim=(cross_dim,) * 2,
                      norm_num_groups=8, sample_size=resolution // vae.downsample_factor)
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=cross_dim, intermediate_size=2 * cross_dim,
                          projection_dim=cross_dim, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=max_length)
    return {"unet": unet, "vae": vae, "text_encoder": text}


_KINDS = {"unet": "unet", "vae": "vae", "text_encoder": "clip_text"}


def write_random_model(dst: str | Path, *, seed: int = 0, configs: dict | None = None,
                       words=TINY_WORDS, scheduler: dict | None = None, overwrite: bool = False) -> Path:
    """Writes a jedi_jax model folder with random weights (and a tokenizer for `words`)."""
    import tempfile

    from jedi_jax.models.clip_text import check_vocabulary
    from jedi_jax.models.tokenizer import write_test_tokenizer

    configs = dict(configs or tiny_configs())
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer"
        vocab = write_test_tokenizer(tok, words)
        text = configs["text_encoder"]
        check_vocabulary(len(vocab), text)
        # Special-token ids of this vocabulary (the pooled output reads the end-of-text position).
        configs["text_encoder"] = dataclasses.replace(text, bos_token_id=vocab["<|startoftext|>"],
                                                      eos_token_id=vocab["<|endoftext|>"],
                                                      pad_token_id=vocab["<|endoftext|>"])
        parts = {}
        for i, (name, config) in enumerate(configs.items()):
            _, params = Functional.create(comp.model_factory(_KINDS[name], config), seed=seed + i)
            parts[name] = (_KINDS[name], config, params)
        sched = Path(tmp) / "scheduler"
        sched.mkdir()
        (sched / "scheduler_config.json").write_text(json.dumps(scheduler or SD_SCHEDULER, indent=2))
        return write_model_folder(dst, parts, extra_folders={"tokenizer": tok, "scheduler": sched},
                                  overwrite=overwrite, source=f"random init, seed {seed}")
