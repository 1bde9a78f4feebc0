"""Shared pieces of the training configs (configs/sd15.py, configs/mini.py).

Every config is an ml_collections ConfigDict with these sections (all keys exist up front; the
trainer locks the config, so a mistyped override such as `--config.train.step=10` is an error):

    seed        base seed (params, noise, data order)
    model       pretrained folder or random-init architecture (diffusers/transformers dicts), dtypes
    schedule    the training noise schedule (diffusers scheduler_config keys)
    data        the set loader (jedi_jax/train/loader.py) and its source
    train       steps, optimizer, EMA, logging
    mesh        device mesh and the logical-axis sharding rules (data, not code)
    checkpoint  orbax checkpointing
    sample      sample grids during training (0 = off), via jedi_jax.train.hooks.sample_grid
"""
from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes (see jedi_jax/train/sharding.py). Data parallel over ('data', 'fsdp'),
# parameters / moments ZeRO-3-split over 'fsdp' along the `in` dim of linears, `out` dim of convs.
from jedi_jax.train.sharding import DEFAULT_RULES  # noqa: E402  (the rules live with the code that applies them)

# Stable Diffusion 1.x scheduler (diffusers scheduler_config.json of runwayml/stable-diffusion-v1-5).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                   clip_sample=False)


def sd15_unet(in_channels: int = 9) -> dict:
    """SD 1.5 UNet (diffusers config keys) with the 9-channel JeDi input."""
    return dict(in_channels=in_channels, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)


def sd15_vae() -> dict:
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                norm_num_groups=32, scaling_factor=0.18215)


def sd15_text() -> dict:
    return dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def tiny_unet(cross_dim: int = 32) -> dict:
    """2-level SD-layout UNet (same blocks as SD: ResNet + cross-attention transformer + coupled attention)."""
    return dict(in_channels=9, out_channels=4, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=cross_dim, norm_num_groups=8)


def tiny_vae() -> dict:
    """3-level KL VAE, 4x downsampling (as jedi_jax.models.tiny)."""
    return dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                norm_num_groups=8, scaling_factor=0.18215)


def tiny_text(hidden: int = 32, max_len: int = 16) -> dict:
    """2-layer CLIP text encoder over the packaged mini-world tokenizer (240 tokens, eos = highest id)."""
    return dict(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=max_len, hidden_act="quick_gelu",
                bos_token_id=238, eos_token_id=239, pad_token_id=239)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        pretrained="",  # converted jedi_jax model folder (python -m jedi_jax.convert); "" = random init below
        unet=sd15_unet(),  # random-init architecture (ignored when `pretrained` is set)
        vae=sd15_vae(),
        text_encoder=sd15_text(),
        # CLIP tokenizer folder; "" = the pretrained folder's, else the packaged mini-world one (a
        # pretrained text encoder without its tokenizer/ is refused: its weights need their vocabulary)
        tokenizer="",
        max_text_len=77,
        text_layer="last",  # clip_text.encode_prompts layer: "last" (SD 1.x), "penultimate", "embeddings", "tokens" (JeDi-mini), or an int
        dtype="bfloat16",  # compute dtype of UNet and text encoder (params stay float32)
        vae_dtype="float32",  # SD's VAE is force_upcast
        attention_kernel="xla",  # "xla" | "cudnn" | "chunked"
        remat=False,  # rematerialize transformer blocks (memory for compute)
    ))

    c.schedule = ml_collections.ConfigDict(dict(SD_SCHEDULE))

    c.data = ml_collections.ConfigDict(dict(
        source="mini_world",  # "mini_world" | "array_record:PATH" | "module:factory"
        split="train",
        num_sets=100_000,  # mini_world: number of distinct sets
        source_set_size=0,  # mini_world: renders per set (0 = set_size)
        num_subjects=0,  # mini_world: distinct subjects (0 = a new subject per set)
        first_set=0,  # mini_world and pools: sets [first_set, first_set + num_sets) (another offset, other subjects)
        pool_cache="",  # jedi_jax.data.pool sources: .npz cache of the rendered (and encoded) pool
        latent_vae="",  # jedi_jax.data.pool:latents_from_config: model folder whose VAE encodes the pool
        caption_wording="world",  # pool sources: "world" | "world+prompt" | "world+prompt+place" | "placed" (pool.WORDINGS)
        batch_size=32,  # GLOBAL sets per step
        set_size=4,  # N members per set
        image_size=512,
        max_ref=-1,  # most references per set (-1 = N-1)
        caption_dropout=0.1,  # per-member empty caption (classifier-free text guidance)
        ref_dropout=0.1,  # per-set: no references (pure joint generation)
        hflip=0.5,
        flip_mode="member",  # "member" | "set"
        flip_swap_words=(("left", "right"),),  # caption words swapped in flipped members
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        resample="bilinear",
        num_workers=8,  # loader threads per process
        prefetch=2,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=100_000,  # train steps (micro-steps when grad_accum > 1)
        lr=1e-5,
        warmup_steps=1000,  # in optimizer updates
        decay="constant",  # "constant" | "cosine"
        end_lr_factor=0.0,  # cosine: final lr = lr * end_lr_factor
        weight_decay=1e-2,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,  # global-norm clipping (0 = off)
        grad_accum=1,  # optax.MultiSteps
        ema_decay=0.9999,  # 0 = no EMA params
        loss_weighting="member",  # "member": each generated image weighs the same; "set": each set (train/step.py)
        subject_weight=0.0,  # > 0: the subject's latent cells weigh 1 + this in each image's loss (needs masks)
        subject_weight_high_noise=-1.0,  # >= 0: the subject weight at t >= high_noise_from_t; < 0: subject_weight
        high_noise_from_t=500,  # where the high-noise part of the schedule starts (train/step.py)
        log_every=50,
        peak_flops_per_chip=0.0,  # for MFU; 0 = from the device kind table (jedi_jax/train/step.py)
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        axes=("data", "fsdp"),
        shape=(1, -1),  # per slice; -1 = all remaining devices
        dcn_shape=(),  # across slices / nodes (multi-slice TPU, multi-node GPU); () = single slice
        rules=DEFAULT_RULES,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=1000,  # steps between checkpoints
        keep=3,  # most recent checkpoints kept
        keep_best=1,  # plus the best by `best_metric` (0 = off)
        best_metric="loss",
        best_mode="min",
        async_save=True,
        preemption_sync_every=10,  # multi-process: steps between agreeing on SIGTERM
    ))

    c.sample = ml_collections.ConfigDict(dict(
        every=0,  # steps between sample grids (0 = off); needs jedi_jax.train.hooks.sample_grid
        num_sets=4,
        num_steps=25,
        guidance_scale=5.0,  # text guidance
        image_guidance_scale=2.0,  # reference-image guidance (JeDi Sec. 3.4)
        use_ema=True,
    ))
    # Locked: a config file (or a caller) can set these keys but not add one, so a misspelled
    # `c.train.warmup = 50` is an error where it is written, not a setting nothing reads. Whole
    # sub-dicts (the random-init architectures, model.unet/vae/text_encoder) may still be replaced.
    c.lock()
    return c


def tiny_model(c: ml_collections.ConfigDict) -> None:
    """Random-weight tiny SD-layout networks (runs on a CPU)."""
    c.model.pretrained = ""
    c.model.unet = ml_collections.ConfigDict(tiny_unet())
    c.model.vae = ml_collections.ConfigDict(tiny_vae())
    c.model.text_encoder = ml_collections.ConfigDict(tiny_text())
    c.model.max_text_len = 16
    c.model.dtype = "float32"


def micro_model(c: ml_collections.ConfigDict) -> None:
    """The smallest SD-layout networks (1-level UNet with cross + coupled attention, 1-level VAE,
    1-layer text encoder): for CI tests of the training machinery, where compile time dominates."""
    c.model.pretrained = ""
    c.model.unet = ml_collections.ConfigDict(dict(
        in_channels=9, out_channels=4, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2, cross_attention_dim=16,
        norm_num_groups=8))
    c.model.vae = ml_collections.ConfigDict(dict(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.18215))
    c.model.text_encoder = ml_collections.ConfigDict(tiny_text(hidden=16, max_len=8))
    c.model.text_encoder.num_hidden_layers = 1
    c.model.max_text_len = 8
    c.model.dtype = "float32"
