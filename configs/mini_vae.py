r"""JeDi-mini, part 1: a small KL autoencoder (diffusers AutoencoderKL layout) for the mini world,
64x64x3 renders -> 16x16x4 latents, trained with L1 reconstruction + a small KL term.

    python -m jedi_jax.train.vae_trainer --config configs/mini_vae.py:gpu --workdir runs/mini_vae_gpu
    python -m jedi_jax.train.vae_trainer --config configs/mini_vae.py:cpu --workdir runs/mini_vae_cpu
    python -m jedi_jax.train.vae_trainer --config configs/mini_vae.py:tiny --workdir /tmp/mini_vae_tiny

Each prints a progress line every `train.log_every` steps:
    step   2000/10000  loss 0.0425  l1 0.0425  kl 13127  psnr 27.08 dB  lr 9.13e-04  100.8 steps/s ... ETA 1m21s
and ends with one JSON line {step, test_psnr, scaling_factor, export_dir, png}.

Variants (`get_config(arg)`; any key can be overridden, e.g. --config.train.steps=200; unknown
keys are errors because the config is locked):

  gpu            THE model: (32, 64, 128) x1, mid attention, 16 groups: 2.70 M params (10.3 MiB
      float32; decoder 1.68 M), ~2.9 GFLOP per 64x64 image forward (decoder ~2.1). Batch 128,
      bfloat16 compute, pool of 20k train renders built with 16 processes, 10k steps.
      Measured on one H200: pool 4.5 s, compile ~45 s, ~100 steps/s (~87 with logging, quick
      evals and checkpoints), so ~2 min of training; 9400 steps gave test PSNR 29.6 dB (512 test
      renders; 27.1 dB at 2000 steps, 28.8 at 5000) and scaling_factor ~0.36. Tried on the same
      card (6000 steps each): (64, 128, 128)/32 groups 29.7 dB at 82 steps/s (14.5 MiB, ~2.2x the
      decoder FLOPs); layers_per_block=2 29.0 dB at 66 steps/s.
  cpu (default)  a CPU-sized model: (16, 32, 64) x1, 8 groups (0.68 M params, 2.6 MiB, a quarter
      of the FLOPs), batch 8, float32, pool of 2048 renders, 800 steps. On 2 shared, busy CPU
      cores (nice 10) it runs ~1-1.5 steps/s after a ~40 s compile (the gpu architecture at batch
      16: ~0.2 steps/s), so ~12 min in all; it reaches only ~20 dB test PSNR: it shows the
      trainer learning, it is not a usable VAE -- train the gpu variant for JeDi-mini.
  tiny           a very small network for smoke runs and tests (seconds).

Outputs in WORKDIR: checkpoints/ (orbax, resumed from the latest: re-running the command continues
or, when finished, only re-exports), metrics.jsonl, vae_export/ (a jedi_jax model folder holding
the `vae` component, config.json with the computed scaling_factor), reconstructions.png (test
renders: originals above reconstructions), summary.json (test PSNR, scaling factor, timings).
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        block_out_channels=(32, 64, 128),  # 3 levels: 64x64 -> 16x16 latents
        layers_per_block=1,  # encoder resnets per level (the decoder has one more)
        latent_channels=4,
        norm_num_groups=16,
        mid_block_add_attention=True,  # single-head attention at 16x16 in encoder and decoder mid block
        dtype="float32",  # compute dtype: "float32" | "bfloat16" (params stay float32)
    ))

    c.data = ml_collections.ConfigDict(dict(
        pool_size=4096,  # train-split renders generated at start (mini_world.make_set)
        pool_workers=2,  # processes generating the pool (0 = in this process)
        set_size=8,  # renders per make_set call (one subject, different contexts)
        batch_size=16,
        hflip=0.5,  # probability of a horizontal flip per image
        eval_renders=512,  # test-split renders for the final PSNR
        eval_every=500,  # steps between quick test PSNR (on the first `eval_quick` renders); 0 = off
        eval_quick=128,
        eval_batch=64,
        scale_renders=2048,  # train renders (from the pool) whose latents give the scaling factor
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=3000,
        lr=1e-3,
        warmup_steps=100,
        decay="cosine",  # "cosine" | "constant"
        end_lr_factor=0.05,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,  # 0 = off
        l1_weight=1.0,  # per-pixel mean |x - x'| ([-1, 1] images)
        l2_weight=0.0,  # per-pixel mean (x - x')^2
        kl_weight=1e-6,  # SD convention: times KL summed over latent elements / pixel values summed per image
        ema_decay=0.0,  # 0 = off; else EMA params (warmup min(d, (1+t)/(10+t))) are evaluated and exported
        log_every=50,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=500,  # steps between checkpoints (also at the end)
        keep=2,
    ))

    c.export = ml_collections.ConfigDict(dict(
        png_images=8,  # test renders shown in reconstructions.png
        png_zoom=3,
    ))
    c.lock()  # variants set keys, never add one (a misspelled key is an error where it is written)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    arg = arg or "cpu"
    if arg == "cpu":
        # A quarter of the FLOPs of the gpu architecture (2.6 vs 10 MiB): ~1 step/s at batch 8 on
        # 2 shared CPU cores, so ~10 minutes of CPU shows it learning.
        c.model.block_out_channels = (16, 32, 64)
        c.model.norm_num_groups = 8
        c.data.pool_size = 2048
        c.data.batch_size = 8
        c.data.eval_every = 200
        c.data.eval_quick = 64
        c.train.steps = 800
        c.train.warmup_steps = 50
        c.train.log_every = 25
        c.checkpoint.every = 200
    elif arg == "gpu":
        c.model.dtype = "bfloat16"
        c.data.pool_size = 20_000
        c.data.pool_workers = 16
        c.data.batch_size = 128
        c.data.eval_every = 1000
        c.train.steps = 10_000
        c.train.lr = 1e-3
        c.train.warmup_steps = 200
        c.train.ema_decay = 0.999
        c.train.log_every = 100
        c.checkpoint.every = 1000
    elif arg == "tiny":
        c.model.block_out_channels = (8, 16, 16)
        c.model.norm_num_groups = 4
        c.model.mid_block_add_attention = False
        c.data.pool_size = 64
        c.data.pool_workers = 0
        c.data.batch_size = 8
        c.data.eval_renders = 16
        c.data.eval_quick = 8
        c.data.eval_batch = 8
        c.data.eval_every = 0
        c.data.scale_renders = 32
        c.train.steps = 30
        c.train.warmup_steps = 5
        c.train.log_every = 10
        c.checkpoint.every = 15
    else:
        raise ValueError(f"unknown variant {arg!r}: use 'cpu', 'gpu' or 'tiny'")
    return c
