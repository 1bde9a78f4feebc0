r"""JeDi-mini, part 2: the joint-image UNet of the embedded default model (the mini world, 64 px).

Same code paths as SD 1.5 JeDi: SD-layout UNet with the 9-channel input and coupled self-attention
at every level, frozen KL VAE (part 1, configs/mini_vae.py, 64x64x3 -> 16x16x4) and frozen CLIP
text encoder, trained on mini-world sets of N=4 with 0..3 clean references and the loss on the
generated members only. Recipe chosen for little compute (in calibration runs whose notes are not
shipped): latent space, v-prediction, cosine schedule, warmup, EMA.

    # part 1 (the VAE), then part 2, a UNet from scratch on the exported VAE folder's latents:
    python -m jedi_jax.train.vae_trainer --config configs/mini_vae.py:gpu --workdir runs/mini_vae
    python -m jedi_jax.train --config configs/mini.py --workdir runs/mini \
        --config.model.pretrained=runs/mini_vae/vae_export --config.data.latent_vae=runs/mini_vae/vae_export
    python -m jedi_jax.train.export --workdir runs/mini --dst runs/jedi_mini
  or all of it (plus MiniBench): bash launch/train_mini.sh [cpu|gpu]. The shipped model
  (jedi_jax/assets/jedi_mini) is not that: it is the eleventh UNet stage of a chain of warm starts.
  ("Stage" below means the model card's numbering of the UNet's training runs: 1, 2, then
  3a-3i = stages 3-11; the VAE is not a stage there.)

Variants: '' (= cpu) for 2 CPU cores, float32, 8 sets per step; 'gpu' for one H100/H200: bf16,
128 sets per step (launch/one_gpu_session.sh runs it time-boxed, warm-started from the shipped
model). Expect a progress line every 50 steps and a sample grid every 1000 (gpu: 5000) steps in
runs/mini/samples/ (references kept, other members regenerated; mse_to_truth falls as identity and
context are learned). `--config.data.caption_wording=world+prompt` adds MiniBench's prompt wording
to the captions (data/pool.WORDINGS; stages 3a-3b used it); `world+prompt+place` also has a quarter
of the captions name the placement without the background (stage 3c); `placed` keeps only captions
that name the placement (stage 3d); stage 3e adds `--config.train.loss_weighting=set`
(every set weighs the same in the loss, so sets with 3 references count as much as those with
none; train/step.py), stage 3f `--config.train.subject_weight=3` (the subject's latent cells
weigh 1 + 3 in each image's loss), stage 3g continues 3f's folder with
`--config.train.subject_weight=6`, stage 3h continues 3g's with `--config.model.text_layer=tokens`,
and stage 3i, the shipped UNet, continues 3h's 4,000 more steps (seed 1)
(jedi_jax/assets/jedi_mini/MODEL_CARD.md has the shipped chain's commands, EXPERIMENTS.md the
rest; they spell out the text layer each stage read, since this default changed). The text encoder
is a small CLIP (random, frozen: its job is to keep the caption tokens apart; the UNet's
cross-attention learns to read them), read at `model.text_layer="tokens"`: its
token embeddings, normed, without the position embeddings (stage 3h; stages 3b-3g read
"embeddings", token + position; stages 1-3a "last"; export records the layer in jedi_model.json).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from configs import common  # noqa: E402

MINI_UNET = dict(in_channels=9, out_channels=4, block_out_channels=(32, 64, 64),
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                 layers_per_block=1, attention_head_dim=(1, 2, 2), cross_attention_dim=64, norm_num_groups=16,
                 sample_size=16)
# diffusers DDIMScheduler keys: v-prediction on the cosine schedule, "trailing" steps at inference.
MINI_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                     timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=False, clip_sample=False)


def get_config(arg: str | None = None):
    c = common.base_config()
    c.model.pretrained = ""  # the part-1 VAE folder (runs/mini_vae/vae_export); UNet and text encoder random
    c.model.unet = ml_collections.ConfigDict(MINI_UNET)
    c.model.vae = ml_collections.ConfigDict(common.tiny_vae())  # replaced by the pretrained VAE
    c.model.text_encoder = ml_collections.ConfigDict(common.tiny_text(hidden=64, max_len=20))
    c.model.max_text_len = 20
    # Cross-attend to the (normed) token embeddings alone: not the random encoder's last layer, whose
    # causal attention leaks each word into the next, nor its random position embeddings, which move a
    # word's vector more than changing the word does (MODEL_CARD.md: "the text side"; EXPERIMENTS.md:
    # stage 3h).
    c.model.text_layer = "tokens"
    c.model.dtype = "float32"
    c.schedule = ml_collections.ConfigDict(MINI_SCHEDULE)

    # A pool of train sets rendered once and encoded once by the part-1 VAE (data.latent_vae):
    # no VAE encoder in the step, which on 2 CPU cores would cost more than the small UNet.
    c.data.source = "jedi_jax.data.pool:latents_from_config"
    c.data.num_sets = 2_000
    c.data.source_set_size = 6  # renders per subject; N=4 of them are drawn per step
    c.data.set_size = 4
    c.data.image_size = 64
    c.data.batch_size = 8
    c.data.hflip = 0.0  # captions say left/right and subjects carry chiral marks
    c.data.crop_scale = (1.0, 1.0)  # captions say small/large and where
    c.data.num_workers = 1

    c.train.steps = 40_000
    c.train.lr = 3e-4
    c.train.warmup_steps = 200
    c.train.decay = "constant"
    c.train.weight_decay = 1e-2
    c.train.ema_decay = 0.995
    c.train.log_every = 50
    c.checkpoint.every = 500
    c.checkpoint.keep = 2
    c.sample.every = 1000
    c.sample.num_sets = 2
    c.sample.num_steps = 20
    c.sample.guidance_scale = 3.0

    if arg in (None, "", "cpu"):
        pass
    elif arg == "gpu":
        # A 1.8M-param UNet on 16x16 latents is launch-bound on an H100/H200: 128 sets per step cost
        # little more than 8. The loader stays in the main thread (it overlaps the asynchronously
        # dispatched step; worker threads only fight over the GIL) and tokenizes from a memo.
        c.model.dtype = "bfloat16"
        c.data.batch_size = 128
        c.data.num_sets = 40_000
        c.data.num_workers = 0
        c.train.steps = 20_000
        c.train.lr = 5e-4
        c.train.ema_decay = 0.999
        c.checkpoint.every = 1000
        c.checkpoint.keep = 30  # every checkpoint stays for eval.learning_curve
        c.sample.every = 5000
    else:
        raise ValueError(f"unknown variant {arg!r}: use '' (cpu) or 'gpu'")
    return c
