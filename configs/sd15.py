r"""JeDi fine-tuning of Stable Diffusion 1.5 (Zeng et al., CVPR 2024, Sec. 4): the SD 1.5 UNet,
widened to the 9-channel inpainting input (zero-init), trained on same-subject sets of N=4 images
at 512 px with the VAE and CLIP text encoder frozen, bf16 compute with float32 master weights.

Variants (`get_config(arg)`):

  (default)  one host, any accelerator count. Needs a converted SD 1.5 folder and a set data set:
      python -m jedi_jax.convert --src stable-diffusion-v1-5 --dst sd15-jax --unet-in-channels 9
      python -m jedi_jax.train --config configs/sd15.py --workdir runs/sd15 \
          --config.model.pretrained=sd15-jax --config.data.source=array_record:/data/jedi_sets/1.0.0
    array_record:PATH takes a TFDS version folder (dataset_info.json and *-train.array_record-*
    shards) or one .array_record file. Expect: a few minutes to load and compile, then a progress
    line every 50 steps; the loss starts at SD 1.5's own epsilon loss (the widened model computes
    SD 1.5 exactly at step 0).

  :tiny      random-weight tiny SD-layout networks on the procedural mini world, 32 px, CPU:
      python -m jedi_jax.train --config configs/sd15.py:tiny --workdir /tmp/jedi_tiny
    Expect (2 idle CPU cores, 2026-12-02): 91 s in all, 20 s of it compiling, then ~6.4 steps/s
    (~52 sets/s = ~207 images/s, data rendering included; ~1.5-3 steps/s when other work shares the
    cores); loss ~1.1 at step 10 (random epsilon predictions) -> ~0.24 at step 200;
    checkpoints at steps 100 and 200; re-running the command says "nothing to do". Sample grids:
    add --config.sample.every=100. From a converted random-weight folder instead of a random init:
      python -c "from jedi_jax.models.tiny import write_random_model as w; w('/tmp/tiny-jax')"
      python -m jedi_jax.train --config configs/sd15.py:tiny --workdir /tmp/jedi_tiny_ft \
          --config.model.pretrained=/tmp/tiny-jax

  :micro     the smallest SD-layout networks at 8 px, 6 steps: what the CI tests train (compile-bound).

  :h100x8    one 8x H100/H200 node: FSDP over the 8 GPUs, 8 sets (32 images) per GPU, cuDNN attention:
      python -m jedi_jax.train --config configs/sd15.py:h100x8 --workdir /ckpt/jedi_sd15 \
          --config.model.pretrained=/ckpt/sd15-jax --config.data.source=array_record:/data/jedi_sets/1.0.0
    Several nodes: launch/gpu_slurm.sh (mesh.dcn_shape = (nodes, 1)). The per-GPU batch is an
    estimate not yet measured on hardware: on OOM set --config.model.remat=True or lower
    data.batch_size; `python -m jedi_jax.train.bench --config configs/sd15.py:h100x8
    --config.model.pretrained= [--config.mesh.shape='(1,-1)' for one GPU]` reports step time, MFU,
    peak memory and the largest batch the compiled step's memory extrapolates to, without data or
    weights. On one H200 (2026-11-26) the first attempt hit cuDNN's odd-key-length limit (CLIP's 77
    tokens, now padded to 80) and a chunked-attention retry did not finish init + compile in 270 s.

  :v5e-64    a v5e-64 TPU slice (16 hosts x 4 chips, 16 GB HBM each): FSDP over all 64 chips,
      2 sets per chip, remat on, chunked attention (as the default). Launch on every worker with
      launch/tpu_vm.sh.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402


def get_config(arg: str | None = None):
    c = common.base_config()
    c.model.pretrained = "sd15-jax"
    c.data.source = ""  # required: a same-subject set data set (see the docstring)
    c.data.image_size = 512
    c.data.set_size = 4
    c.data.batch_size = 32
    c.train.lr = 1e-5
    c.train.warmup_steps = 1000
    c.train.steps = 100_000
    c.mesh.shape = (1, -1)
    # The coupled self-attention of the top UNet level spans the set: N x 64 x 64 = 16,384 tokens at
    # 512 px, N=4. "xla" materialises the (B, 8, 16384, 16384) float32 scores: 8 GiB per set and
    # call, more than a v5e chip's 16 GB at 2 sets. "chunked" (a scan over key chunks, rematerialised)
    # never does, on any backend; "cudnn" (GPUs) is the fast choice where it runs.
    c.model.attention_kernel = "chunked"

    arg = arg or ""
    if arg == "":
        pass
    elif arg == "tiny":
        common.tiny_model(c)
        c.model.attention_kernel = "xla"  # 32 px: 4 x 16 x 16 tokens, the scores are small
        c.data.source = "mini_world"
        c.data.num_sets = 10_000
        c.data.hflip = 0.0  # mini-world renders must not be mirrored (SetLoader refuses)
        c.data.image_size = 32
        c.data.batch_size = 8
        c.data.num_workers = 0
        c.train.steps = 200
        c.train.lr = 3e-4
        c.train.warmup_steps = 20
        c.train.decay = "cosine"
        c.train.ema_decay = 0.99
        c.train.log_every = 10
        c.checkpoint.every = 100
        c.checkpoint.async_save = True
    elif arg == "micro":  # CI tests of the training machinery (tests/test_train_*.py)
        common.micro_model(c)
        c.model.attention_kernel = "xla"
        c.data.source = "mini_world"
        c.data.num_sets = 1000
        c.data.hflip = 0.0  # mini-world renders must not be mirrored (SetLoader refuses)
        c.data.image_size = 8
        c.data.batch_size = 8
        c.data.num_workers = 0
        c.train.steps = 6
        c.train.lr = 1e-3
        c.train.warmup_steps = 2
        c.train.ema_decay = 0.9
        c.train.log_every = 1
        c.checkpoint.every = 2
    elif arg == "h100x8":
        c.data.batch_size = 64  # 8 sets = 32 images of 512 px per GPU
        c.model.attention_kernel = "cudnn"
        c.mesh.shape = (1, 8)
        c.data.num_workers = 16
    elif arg == "v5e-64":
        c.data.batch_size = 128  # 2 sets = 8 images per chip
        c.model.remat = True
        c.mesh.shape = (1, 64)  # 860M params x 16 bytes (param, 2 moments, EMA) must be split
        c.data.num_workers = 16
    else:
        raise ValueError(f"unknown variant {arg!r}: use '', 'tiny', 'micro', 'h100x8' or 'v5e-64'")
    return c
