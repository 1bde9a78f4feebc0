"""End-to-end conversion: a diffusers folder written by `save_pretrained` -> `python -m jedi_jax.convert`
-> our loaders, equal to the PyTorch models; export back gives identical tensors; broken folders fail clearly."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jedi_jax.convert.__main__ import main as convert_main
from jedi_jax.convert.torch_naming import ConversionError
from jedi_jax.loading import load_model
from jedi_jax.models.tokenizer import write_test_tokenizer

WORDS = ["a", "photo", "of", "dog", "on", "the", "beach"]
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A random-weight SD-layout pipeline folder, as diffusers / transformers save it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("diffusers") / "sd"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    vocab = write_test_tokenizer(root / "tokenizer", WORDS)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"])).eval()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root, unet, vae, text


@pytest.fixture(scope="module")
def converted(diffusers_dir, tmp_path_factory):
    src = diffusers_dir[0]
    dst = tmp_path_factory.mktemp("converted") / "jax"
    assert convert_main(["--src", str(src), "--dst", str(dst)]) == 0
    return dst


def test_converted_models_equal_pytorch(diffusers_dir, converted):
    _, unet_t, vae_t, text_t = diffusers_dir
    model = load_model(converted)
    rng = np.random.default_rng(0)
    # UNet, N = 1
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    ctx = rng.normal(size=(2, 5, 32)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = unet_t(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    ours = model.unet.functional.bind(model.unet.params)(
        jnp.asarray(x.transpose(0, 2, 3, 1))[:, None], jnp.asarray(t), jnp.asarray(ctx)[:, None])
    err_unet = np.abs(np.asarray(ours)[:, 0].transpose(0, 3, 1, 2) - ref).max()
    # VAE encode / decode
    img = rng.uniform(-1, 1, size=(2, 3, 16, 16)).astype(np.float32)
    vae = model.vae.functional.bind(model.vae.params)
    with torch.no_grad():
        dist = vae_t.encode(torch.from_numpy(img)).latent_dist
        dec = vae_t.decode(dist.mean).sample.numpy()
    mean, logvar = vae.encode(jnp.asarray(img.transpose(0, 2, 3, 1)))
    err_enc = np.abs(np.asarray(mean).transpose(0, 3, 1, 2) - dist.mean.numpy()).max()
    err_dec = np.abs(np.asarray(vae.decode(mean)).transpose(0, 3, 1, 2) - dec).max()
    # Text encoder, through the converted tokenizer
    ids = model.tokenizer(["a photo of the dog on the beach", ""], padding="max_length", max_length=16,
                          return_tensors="np")["input_ids"]
    with torch.no_grad():
        hid = text_t(torch.from_numpy(ids)).last_hidden_state.numpy()
    err_text = np.abs(np.asarray(model.text_encoder.functional.bind(model.text_encoder.params)(jnp.asarray(ids))
                                 .last_hidden_state) - hid).max()
    print(f"\nparity after conversion: unet {err_unet:.2e} vae-enc {err_enc:.2e} vae-dec {err_dec:.2e} text {err_text:.2e}")
    assert max(err_unet, err_enc, err_dec, err_text) <= 1e-4
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"


def test_round_trip_gives_identical_tensors(diffusers_dir, converted, tmp_path):
    src = diffusers_dir[0]
    back = tmp_path / "back"
    assert convert_main(["--export-diffusers", "--src", str(converted), "--dst", str(back)]) == 0
    for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a = load_file(str(src / name / f"{stem}.safetensors"))
        b = load_file(str(back / name / f"{stem}.safetensors"))
        a = {k if name != "text_encoder" or k.startswith("text_model.") else "text_model." + k: v for k, v in a.items()}
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
    # and the exported folder loads in diffusers
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(back / "unet")


def test_widened_conv_in_computes_the_same(diffusers_dir, tmp_path):
    src = diffusers_dir[0]
    dst = tmp_path / "jedi9"
    assert convert_main(["--src", str(src), "--dst", str(dst), "--unet-in-channels", "9"]) == 0
    m4 = load_model(tmp_path / "unused" if False else dst)
    assert m4.unet.config.in_channels == 9
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 1, 8, 8, 4)).astype(np.float32)
    extra = rng.normal(size=(1, 1, 8, 8, 5)).astype(np.float32)
    ctx = rng.normal(size=(1, 1, 5, 32)).astype(np.float32)
    unet = m4.unet.functional.bind(m4.unet.params)
    a = unet(jnp.concatenate([x, extra], -1), jnp.array([50]), ctx)
    b = unet(jnp.concatenate([x, 0 * extra], -1), jnp.array([50]), ctx)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _copy(src, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("drop_tensor", "missing tensor 'conv_in.weight'"),
    ("extra_tensor", "unexpected tensor 'extra.weight'"),
    ("wrong_shape", "'conv_out.bias' has shape"),
    ("truncated", "cannot read"),
    ("no_config", "config.json"),
    ("bad_option", "unsupported UNet option"),
])
def test_broken_folder_fails_clearly_and_leaves_nothing(diffusers_dir, tmp_path, capsys, damage, message):
    src = _copy(diffusers_dir[0], tmp_path)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    if damage == "drop_tensor":
        del tensors["conv_in.weight"]
        save_file(tensors, str(weights))
    elif damage == "extra_tensor":
        save_file(dict(tensors, **{"extra.weight": np.zeros(3, np.float32)}), str(weights))
    elif damage == "wrong_shape":
        save_file(dict(tensors, **{"conv_out.bias": np.zeros(3, np.float32)}), str(weights))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no_config":
        (src / "unet" / "config.json").unlink()
    elif damage == "bad_option":
        cfg = json.loads((src / "unet" / "config.json").read_text())
        cfg["class_embed_type"] = "timestep"
        (src / "unet" / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    assert convert_main(["--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_restore_is_strict(converted, tmp_path):
    from jedi_jax.loading import load_component

    broken = _copy(converted, tmp_path)
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 32]
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="has shape"):
        load_component(broken, "unet")
    with pytest.raises(ConversionError, match="not a jedi_jax model folder"):
        load_component(tmp_path, "unet")
