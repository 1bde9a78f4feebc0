"""The whole path a lab takes, at toy size: a diffusers SD-layout folder (random weights, 4-channel
text-to-image UNet) -> `python -m jedi_jax.convert` -> `python -m jedi_jax.train --config
configs/sd15.py:tiny` from the converted folder (conv_in widened to 9 channels, real sample hook)
-> `python -m jedi_jax.train.export` -> JeDiPipeline on the exported folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jedi_jax.convert.__main__ import main as convert_main
from jedi_jax.data import mini_world
from jedi_jax.models.tiny import tiny_configs
from jedi_jax.models.tokenizer import write_test_tokenizer
from test_train_sharding import FAST_XLA, REPO


def _diffusers_folder(root):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tiny_configs(resolution=32, jedi=False)
    torch.manual_seed(0)
    vocab = write_test_tokenizer(root / "tokenizer", mini_world.vocabulary())
    UNet2DConditionModel(**cfg["unet"].to_diffusers()).save_pretrained(root / "unet")
    AutoencoderKL(**cfg["vae"].to_diffusers()).save_pretrained(root / "vae")
    text = dict(cfg["text_encoder"].to_transformers(), eos_token_id=vocab["<|endoftext|>"],
                bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(root / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    return root


@pytest.mark.slow
def test_convert_train_export_sample(tmp_path):
    src = _diffusers_folder(tmp_path / "sd_tiny")
    converted = tmp_path / "sd_tiny_jax"
    assert convert_main(["--src", str(src), "--dst", str(converted)]) == 0

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_XLA)
    wd = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "jedi_jax.train", "--config", "configs/sd15.py:tiny", "--workdir", str(wd),
         f"--config.model.pretrained={converted}", "--config.model.text_layer=penultimate", "--config.train.steps=4", "--config.train.log_every=2",
         "--config.checkpoint.every=2", "--config.sample.every=4", "--config.sample.num_steps=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-5000:]
    assert "widening unet conv_in 4 -> 9" in log
    assert "UNet was trained on text_layer='last'; this run uses 'penultimate'" in log  # a switch is said
    assert "step 4/4 | loss" in log
    assert (wd / "samples" / "step_000004.png").exists()
    mse = [json.loads(r)["mse_to_truth"] for r in (wd / "samples" / "metrics.jsonl").read_text().splitlines()]
    assert len(mse) == 1 and np.isfinite(mse[0])

    exported = tmp_path / "exported"
    export = subprocess.run([sys.executable, "-m", "jedi_jax.train.export", "--workdir", str(wd), "--dst",
                             str(exported)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]

    from jedi_jax.loading import load_model
    from jedi_jax.pipeline import JeDiPipeline

    model = load_model(exported)
    assert model.unet.config.in_channels == 9 and model.scheduler_config["beta_schedule"] == "scaled_linear"
    # the frozen VAE and text encoder are the converted ones, through training and export bit for bit
    # (a build that initialized them at random would train and export without complaint)
    import jax

    source = load_model(converted)
    for name in ("vae", "text_encoder"):
        ours, theirs = jax.tree.leaves(model.components[name].params), jax.tree.leaves(source.components[name].params)
        assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs)), name
    # the exported scheduler is the one trained: every key spelled out, so a diffusers reader does not
    # fill in DDIMScheduler's defaults (clip_sample=True, steps_offset=0, set_alpha_to_one=True)
    from configs import sd15
    from jedi_jax.schedulers.schedule import NoiseScheduleConfig

    trained = NoiseScheduleConfig.from_train_config(sd15.get_config("tiny").schedule.to_dict())
    assert NoiseScheduleConfig.from_diffusers(model.scheduler_config) == trained
    assert (trained.clip_sample, trained.steps_offset, trained.set_alpha_to_one) == (False, 1, False)
    assert "(EMA UNet)" in json.loads((exported / "jedi_model.json").read_text())["source"]
    # trained on the penultimate text layer: the folder says so, and sampling reads that layer
    assert model.sampling == {"text_layer": "penultimate"}
    pipe = JeDiPipeline(model, max_references=1)
    assert pipe.text_layer == "penultimate"
    ref = mini_world.make_set("test", 0, n=1)["images"][0]
    out = pipe(["a ball on the beach"], [ref], num_inference_steps=2, seed=0)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
