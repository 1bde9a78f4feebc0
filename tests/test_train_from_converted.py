"""The whole path a lab takes, at toy size: a diffusers SD-layout folder (random weights, 4-channel
text-to-image UNet) -> `python -m jedi_jax.convert` -> `python -m jedi_jax.train --config
configs/sd15.py:tiny` from the converted folder (conv_in widened to 9 channels, real sample hook)
-> `python -m jedi_jax.train.export` -> JeDiPipeline on the exported folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert f"tokenizer: {converted / 'tokenizer'}" in log  # the converted folder's own, said where the run starts
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


# --- which tokenizer a run reads its text encoder through ----------------------------------------

def _model_cfg(pretrained="", tokenizer=""):
    from configs import sd15

    cfg = sd15.get_config("tiny").model
    cfg.pretrained, cfg.tokenizer = str(pretrained), str(tokenizer)
    return cfg


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory):
    """The tiny model folder, a copy without tokenizer/, and a VAE-only folder (configs/mini.py's kind)."""
    import shutil

    from jedi_jax.convert.pipeline_folder import load_component_params, write_model_folder

    root = tmp_path_factory.mktemp("folders")
    full = tiny_model_dir
    no_tok = root / "no_tokenizer"
    shutil.copytree(full, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    config, _, params = load_component_params(full, "vae", "vae")
    vae_only = write_model_folder(root / "vae_only", {"vae": ("vae", config, params)})
    return full, no_tok, vae_only


def test_a_loaded_text_encoder_is_never_read_through_another_tokenizer(folders, monkeypatch, caplog):
    """model.pretrained's text encoder with no tokenizer/ beside it (and no model.tokenizer) is refused,
    before any weights load, with a ConfigError (the trainer CLI's one error line): the packaged
    240-word mini-world tokenizer would feed it ids of another vocabulary. That fallback stays where
    no text encoder is loaded (random init; a VAE-only folder); train.export copies the same folder."""
    import logging

    import jax

    from jedi_jax.data.tokenizer_files import PACKAGED_DIR
    from jedi_jax.train import export
    from jedi_jax.train import models as models_lib
    from jedi_jax.train import sharding as shd
    from jedi_jax.train.trainer import ConfigError

    full, no_tok, vae_only = folders
    assert models_lib.tokenizer_folder(_model_cfg(full)) == full / "tokenizer"
    assert models_lib.tokenizer_folder(_model_cfg(vae_only)) == Path(PACKAGED_DIR)
    assert models_lib.tokenizer_folder(_model_cfg()) == Path(PACKAGED_DIR)
    assert models_lib.tokenizer_folder(_model_cfg(no_tok, full / "tokenizer")) == full / "tokenizer"  # explicit
    with pytest.raises(ConfigError, match=f"model.pretrained='{no_tok}' has a text_encoder but no tokenizer/ "
                                          "folder: its text encoder needs the tokenizer it was trained with"):
        models_lib.tokenizer_folder(_model_cfg(no_tok))
    assert export.models_lib.tokenizer_folder is models_lib.tokenizer_folder and not hasattr(export, "tokenizer_folder")

    cfg = _model_cfg(no_tok)
    mesh = shd.make_mesh(("data", "fsdp"), (1, 1), devices=jax.devices()[:1])
    monkeypatch.setattr(models_lib, "_load", lambda *a, **k: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(ConfigError, match="has a text_encoder but no tokenizer/"):
        models_lib.build(cfg, mesh=mesh, rules=(), seed=0)

    class Built(Exception):
        pass

    def stop(*a, **k):  # what build does right after choosing the tokenizer
        raise Built

    monkeypatch.setattr(models_lib, "configs_from_dicts", stop)
    for pretrained, tokenizer in ((full, full / "tokenizer"), (vae_only, Path(PACKAGED_DIR))):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="jedi_jax.train.models"), pytest.raises(Built):
            models_lib.build(_model_cfg(pretrained), mesh=mesh, rules=(), seed=0)
        assert f"tokenizer: {tokenizer}" in caplog.messages, caplog.messages


def test_trainer_cli_refuses_a_text_encoder_without_its_tokenizer_in_one_line(folders, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_XLA)
    r = subprocess.run([sys.executable, "-m", "jedi_jax.train", "--config", "configs/sd15.py:tiny", "--workdir",
                        str(tmp_path / "run"), f"--config.model.pretrained={folders[1]}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: model.pretrained="), r.stderr[-3000:]
    assert "has a text_encoder but no tokenizer/" in err[0] and "Traceback" not in r.stdout + r.stderr


def test_export_names_a_workdir_that_is_no_training_run(tmp_path, capsys):
    """A mistyped --workdir says so, not 'no checkpoint in .../checkpoints (has [])' (as if the run
    had not saved yet); nothing is written."""
    from jedi_jax.train.export import main as export_main

    (tmp_path / "not_a_run").mkdir()
    for workdir, message in ((tmp_path / "nonexist", f"--workdir {tmp_path / 'nonexist'} does not exist"),
                             (tmp_path / "not_a_run", f"--workdir {tmp_path / 'not_a_run'}: no checkpoints/ folder")):
        assert export_main(["--workdir", str(workdir), "--dst", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_run"]
