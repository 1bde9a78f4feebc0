"""End-to-end conversion: a diffusers folder written by `save_pretrained` -> `python -m jedi_jax.convert`
-> our loaders, equal to the PyTorch models; export back gives identical tensors; broken folders fail clearly."""
import copy
import json
import os
import re
import shutil
import signal
import stat
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jedi_jax.convert import param_io
from jedi_jax.convert.__main__ import main as convert_main
from jedi_jax.convert.pipeline_folder import load_component_params
from jedi_jax.convert.torch_naming import ConversionError
from jedi_jax.loading import load_model
from jedi_jax.models.tokenizer import write_test_tokenizer
from torch_reference import perturb_

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
    unet = perturb_(UNet2DConditionModel(**UNET).eval(), 1)  # norms and biases off their defaults (1, 0)
    vae = perturb_(AutoencoderKL(**VAE).eval(), 2)
    vocab = write_test_tokenizer(root / "tokenizer", WORDS)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"])).eval()
    perturb_(text, 3)
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
    # ... because the pretrained channels are kept exactly and only the new ones are zero
    kernel = np.asarray(m4.unet.params["conv_in"]["kernel"])  # (3, 3, 9, C_out)
    source = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"]  # (O, I, 3, 3)
    np.testing.assert_array_equal(kernel[:, :, :4], source.transpose(2, 3, 1, 0))
    assert np.abs(source).max() > 0
    np.testing.assert_array_equal(kernel[:, :, 4:], 0)


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


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(converted, tmp_path):
    """Ids past the text encoder's vocab_size embed as NaN (jnp.take fills) and poison the whole
    prompt silently: loading such a folder (say, after adding textual-inversion tokens) must fail."""
    folder = _copy(converted, tmp_path)
    vocab_file = folder / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    size = json.loads((folder / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert len(vocab) <= size
    vocab.update({f"newword{i}</w>": len(vocab) + i for i in range(size - len(vocab) + 1)})
    vocab_file.write_text(json.dumps(vocab))
    with pytest.raises(ConversionError, match=f"tokenizer has {size + 1} tokens but the text encoder's "
                                              f"vocab_size is {size}"):
        load_model(folder)
    load_model(converted)  # the folder as converted loads


def _leftovers(folder, name="out"):
    """Hidden temporary / moved-aside siblings of `folder/name` (none may be left behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _cli_error(capsys, argv):
    """Runs the CLI, which must fail with exit code 2 and one `error: ...` line (no traceback)."""
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --- sharded and --variant checkpoints -------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_dir(diffusers_dir, tmp_path_factory):
    """The fixture folder with its UNet saved in many float32 shards (no variant)."""
    src, unet, _, _ = diffusers_dir
    root = tmp_path_factory.mktemp("sharded") / "sd"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(root / "unet", max_shard_size="200KB")
    assert len(list((root / "unet").glob("*.safetensors"))) > 2
    assert (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    return root


@pytest.fixture(scope="module")
def variant_dir(diffusers_dir, tmp_path_factory):
    """The fixture folder as float16 `variant="fp16"` files: UNet (diffusers) and text encoder
    (transformers) sharded, the VAE one file; the names are whatever the libraries write."""
    src, unet, vae, text = diffusers_dir
    root = tmp_path_factory.mktemp("variant") / "sd"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("unet", "vae", "text_encoder"))
    for name, model, shard in (("unet", unet, "200KB"), ("text_encoder", text, "20KB"), ("vae", vae, None)):
        copy.deepcopy(model).half().save_pretrained(root / name, variant="fp16",
                                                    **({"max_shard_size": shard} if shard else {}))
    for name, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        assert (root / name / f"{stem}.safetensors.index.fp16.json").exists(), sorted(os.listdir(root / name))
        assert len(list((root / name).glob("*.safetensors"))) > 1
    assert (root / "vae" / "diffusion_pytorch_model.fp16.safetensors").exists()
    return root


@pytest.mark.parametrize("index_name", ["as_saved", "legacy_diffusers"])
def test_sharded_fp16_variant_converts(variant_dir, converted, tmp_path, index_name):
    src = variant_dir
    if index_name == "legacy_diffusers":  # the older name diffusers still reads (deprecated)
        src = _copy(variant_dir, tmp_path)
        (src / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").rename(
            src / "unet" / "diffusion_pytorch_model.safetensors.fp16.index.json")
    dst = tmp_path / "out"
    assert convert_main(["--src", str(src), "--dst", str(dst), "--variant", "fp16"]) == 0
    for name, kind in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "clip_text")):
        _, _, ours = load_component_params(dst, name, kind)
        _, _, full = load_component_params(converted, name, kind)  # the float32 source, converted
        expect = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), full)
        assert jax.tree.structure(ours) == jax.tree.structure(expect), name
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expect)):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


@pytest.mark.parametrize("damage, message", [
    ("duplicate", "tensor 'conv_in.weight' appears twice"),
    ("moved", "tensor 'conv_in.weight' is in"),
    ("unlisted", "tensor 'conv_in.weight' in "),
    ("phantom", "the index maps tensor 'ghost.weight' to"),
    ("corrupt_index", "diffusion_pytorch_model.safetensors.index.json: not a readable JSON file"),
    ("no_weight_map", "diffusion_pytorch_model.safetensors.index.json: no 'weight_map'"),
])
def test_sharded_read_follows_the_index(sharded_dir, tmp_path, capsys, damage, message):
    src = _copy(sharded_dir, tmp_path)
    index_path = src / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    home = weight_map["conv_in.weight"]
    other = next(f for f in sorted(set(weight_map.values())) if f != home)
    assert sum(f == home for f in weight_map.values()) > 1  # `home` stays in the index without conv_in
    if damage == "duplicate":  # a second copy of a tensor in another shard
        t = load_file(str(src / "unet" / other))
        t["conv_in.weight"] = np.zeros_like(load_file(str(src / "unet" / home))["conv_in.weight"])
        save_file(t, str(src / "unet" / other))
    elif damage == "moved":
        weight_map["conv_in.weight"] = other
    elif damage == "unlisted":
        del weight_map["conv_in.weight"]
    elif damage == "phantom":
        weight_map["ghost.weight"] = other
    if damage == "corrupt_index":
        index_path.write_text("{not json")
    elif damage == "no_weight_map":
        index_path.write_text(json.dumps({"metadata": {}}))
    else:
        index_path.write_text(json.dumps(index))
    dst = tmp_path / "out"
    assert convert_main(["--src", str(src), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not dst.exists() and not _leftovers(tmp_path)


def test_legacy_vae_attention_names(diffusers_dir, converted, tmp_path, capsys):
    src = _copy(diffusers_dir[0], tmp_path)
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    current = load_file(str(weights))
    legacy = {}
    for key, value in current.items():  # the SD 1.x era names, projections stored as 1x1 convs
        m = re.match(r"^(.*\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m:
            key = m[1] + {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}[m[2]] + "." + m[3]
            value = value[:, :, None, None] if m[3] == "weight" else value
        legacy[key] = value
    assert len(set(legacy) - set(current)) >= 8
    save_file(legacy, str(weights))
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "ok")]) == 0
    (_, _, ours), (_, _, ref) = (load_component_params(d, "vae", "vae") for d in (tmp_path / "ok", converted))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the legacy and the current name of one tensor in one file: an error naming both, not "last wins"
    key = "encoder.mid_block.attentions.0.to_q.weight"
    save_file(dict(legacy, **{key: current[key]}), str(weights))
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"'encoder.mid_block.attentions.0.query.weight' and {key!r} both map to {key!r}" in err, err
    assert not (tmp_path / "out").exists()


# --- the exported diffusers folder ----------------------------------------------------------------

def test_exported_folder_loads_as_a_diffusers_pipeline(diffusers_dir, converted, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    src, unet_t, vae_t, text_t = diffusers_dir
    back = tmp_path / "back"
    assert convert_main(["--export-diffusers", "--src", str(converted), "--dst", str(back)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(back)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.safety_checker is None
    prompt = "a photo of the dog on the beach"
    assert pipe.tokenizer(prompt).input_ids == CLIPTokenizer.from_pretrained(src / "tokenizer")(prompt).input_ids
    for ours, ref in ((pipe.unet, unet_t), (pipe.vae, vae_t)):
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.from_numpy(np.array([pipe.tokenizer(prompt, padding="max_length", max_length=16).input_ids]))
    with torch.no_grad():
        np.testing.assert_array_equal(pipe.text_encoder(ids).last_hidden_state.numpy(),
                                      text_t(ids).last_hidden_state.numpy())


@pytest.mark.parametrize("sdxl", [False, True])
def test_export_model_index_fits_its_pipeline_class(tmp_path, sdxl):
    import importlib

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from jedi_jax.convert.pipeline_folder import diffusers_model_index

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kinds = {"unet": "unet", "vae": "vae", "text_encoder": "clip_text"}
    tokenizers = ["tokenizer"]
    if sdxl:
        kinds["text_encoder_2"] = "clip_text_projection"
        tokenizers.append("tokenizer_2")
    for name in tokenizers:
        write_test_tokenizer(tmp_path / name, WORDS)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    index = diffusers_model_index(tmp_path, kinds)
    assert index["_class_name"] == cls.__name__
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    modules, _ = cls._get_signature_keys(cls)
    assert listed == set(modules), (listed, modules)  # every component, including tokenizer(s) and scheduler
    for name in listed:
        library, class_name = index[name]
        if class_name is None:
            assert name in cls._optional_components
        else:
            assert getattr(importlib.import_module(library), class_name), (name, library, class_name)
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]


# --- output folders: permissions, --overwrite, interrupts ----------------------------------------

def test_output_folder_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with param_io.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750  # as `mkdir out` would make it
    assert stat.S_IMODE((tmp_path / "out" / "a").stat().st_mode) == 0o750


def _old_folder(dst):
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    (dst / "sub").mkdir()
    (dst / "sub" / "x.txt").write_text("old")


def test_overwrite_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    _old_folder(dst)
    real_rename, real_replace = os.rename, os.replace

    def failing(real):
        def move(a, b, *args, **kwargs):
            if os.path.basename(a).startswith(".out.tmp"):  # moving the new folder into place
                raise OSError(28, "No space left on device (injected)")
            return real(a, b, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    with pytest.raises(OSError, match="injected"):
        with param_io.atomic_directory(dst, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt", "sub"] and (dst / "sub" / "x.txt").exists()
    assert not _leftovers(tmp_path)


def test_overwrite_interrupted_while_deleting_the_old_folder(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    _old_folder(dst)
    real_rmtree = shutil.rmtree
    calls = []

    def interrupted_rmtree(path, *args, **kwargs):  # Ctrl-C once, partway through deleting the old folder
        name = os.path.basename(path)
        if not calls and (name == "out" or name.startswith(".out.old")):
            calls.append(name)
            real_rmtree(os.path.join(path, "sub"))
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with param_io.atomic_directory(dst, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert calls  # the interrupt did happen
    assert sorted(p.name for p in dst.iterdir()) == ["new.txt"]  # the complete new output
    assert not _leftovers(tmp_path)


def test_interrupt_during_the_parameter_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while orbax's background thread writes: the cleanup must not run before it stops."""
    writers = []

    class SlowCheckpointer:  # orbax's shape: save() starts a background writer, wait/close wait for it
        def save(self, path, params):
            def write():
                time.sleep(0.5)
                os.makedirs(os.path.join(path, "ocdbt.process_0"))  # still writing after the interrupt
            writers.append(threading.Thread(target=write))
            writers[-1].start()

        def wait_until_finished(self):
            while writers[-1].is_alive():
                time.sleep(0.01)

        close = wait_until_finished

    monkeypatch.setattr(param_io.ocp, "StandardCheckpointer", SlowCheckpointer)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            with param_io.atomic_directory(tmp_path / "out") as tmp:
                timer.start()
                param_io.save_params(tmp / "params", {"w": np.zeros(2, np.float32)})
                time.sleep(5)  # not reached with the fix; without it, Ctrl-C would land here instead
    finally:
        signal.signal(signal.SIGINT, previous)
    timer.join()
    writers[-1].join()
    assert not (tmp_path / "out").exists()
    assert not _leftovers(tmp_path)


# --- bad input: one error line, no traceback -----------------------------------------------------

def test_dst_that_is_a_file_is_refused(diffusers_dir, tmp_path, capsys):
    dst = tmp_path / "afile"
    dst.write_text("keep me")
    err = _cli_error(capsys, ["--src", str(diffusers_dir[0]), "--dst", str(dst), "--overwrite"])
    assert "is not a folder" in err and str(dst) in err
    assert dst.read_text() == "keep me" and not _leftovers(tmp_path, "afile")


@pytest.mark.parametrize("damage, message", [
    ("index_list", "model_index.json: expected a JSON object, got list"),
    ("index_class", "component 'unet' has class ['UNet2DConditionModel']"),
    ("config_list", "config.json: expected a JSON object, got list"),
    ("config_value", "config.json: invalid unet config"),
    ("src_file", "is not a folder"),
])
def test_malformed_source_is_one_error_line(diffusers_dir, tmp_path, capsys, damage, message):
    src = _copy(diffusers_dir[0], tmp_path)
    if damage == "index_list":
        (src / "model_index.json").write_text("[1, 2]")
    elif damage == "index_class":
        (src / "model_index.json").write_text(json.dumps({"unet": ["diffusers", ["UNet2DConditionModel"]]}))
    elif damage == "config_list":
        (src / "unet" / "config.json").write_text("[1]")
    elif damage == "config_value":
        cfg = json.loads((src / "unet" / "config.json").read_text())
        (src / "unet" / "config.json").write_text(json.dumps(dict(cfg, block_out_channels=5)))
    elif damage == "src_file":
        src = src / "model_index.json"
    err = _cli_error(capsys, ["--src", str(src), "--dst", str(tmp_path / "out")])
    assert message in err, err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("components", [None, ["unet"], {"unet": "transformer"}])
def test_model_folder_without_valid_components_is_one_error_line(converted, tmp_path, capsys, components):
    src = _copy(converted, tmp_path)
    index = json.loads((src / "jedi_model.json").read_text())
    if components is None:
        del index["components"]
    else:
        index["components"] = components
    (src / "jedi_model.json").write_text(json.dumps(index))
    err = _cli_error(capsys, ["--export-diffusers", "--src", str(src), "--dst", str(tmp_path / "out")])
    assert "jedi_model.json" in err and ("'components'" in err or "unknown kind" in err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("channels, message", [
    ("0", "must be a positive number of channels, got 0"),
    ("-9", "must be a positive number of channels, got -9"),
    # only the source's own width or the JeDi layout 2*latent_channels+1: a 7-channel UNet would be a
    # folder that every tool refuses (sampling: "unet.in_channels=7 must be 2*latent_channels+1=9")
    ("2", "--unet-in-channels) 2: "),
    ("7", "--unet-in-channels) 7: "),
    ("10", "--unet-in-channels) 10: "),
])
def test_unet_in_channels_that_cannot_widen_are_refused(diffusers_dir, tmp_path, capsys, channels, message):
    err = _cli_error(capsys, ["--src", str(diffusers_dir[0]), "--dst", str(tmp_path / "out"),
                              "--unet-in-channels", channels])
    assert message in err, err
    if int(channels) > 0:
        assert "takes 4 input channels and latent_channels=4; give 4 (as is) or 9 (2*latent_channels+1" in err, err
    assert not (tmp_path / "out").exists()


def test_unet_in_channels_equal_to_the_source_is_a_plain_conversion(diffusers_dir, converted, tmp_path):
    dst = tmp_path / "out"
    assert convert_main(["--src", str(diffusers_dir[0]), "--dst", str(dst), "--unet-in-channels", "4"]) == 0
    (_, _, ours), (_, _, ref) = (load_component_params(d, "unet", "unet") for d in (dst, converted))
    np.testing.assert_array_equal(np.asarray(ours["conv_in"]["kernel"]), np.asarray(ref["conv_in"]["kernel"]))


def test_overwrite_refuses_the_working_folder_and_folders_that_are_not_earlier_outputs(tmp_path, monkeypatch):
    # `--out .` or `--out runs` must not take the user's files with the old output.
    work = tmp_path / "work"
    (work / "runs" / "a_run").mkdir(parents=True)
    monkeypatch.chdir(work / "runs")
    for dst in (".", str(work)):
        with pytest.raises(FileExistsError, match="holds the current folder"):
            param_io.check_destination(dst, overwrite=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="has no grid.png: it is not an earlier output"):
        with param_io.atomic_directory(work / "runs", overwrite=True, marker="grid.png"):
            pass
    assert (work / "runs" / "a_run").is_dir() and not _leftovers(work, "runs")
    (tmp_path / "empty").mkdir()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "grid.png").write_bytes(b"old")
    for dst in (tmp_path / "empty", earlier):  # an empty folder or the tool's own earlier output: replaced
        with param_io.atomic_directory(dst, overwrite=True, marker="grid.png") as tmp:
            (tmp / "grid.png").write_bytes(b"new")
        assert (dst / "grid.png").read_bytes() == b"new"


def test_sets_of_one_sample_what_stable_diffusion_samples(diffusers_dir, tmp_path):
    """N = 1 reproduces plain Stable Diffusion end to end: JeDi's pipeline with no references (one
    target, 2-branch classifier-free guidance) on a converted folder whose conv_in was widened to 9
    channels, against diffusers' StableDiffusionPipeline on the source folder, from the same x_T:
    tokenization, the empty prompt, the guidance formula, the DDIM steps (with the folder's
    clip_sample), latent scaling and the decode all have to agree."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from jedi_jax.pipeline import JeDiPipeline, seed_key

    src = diffusers_dir[0]
    dst = tmp_path / "jedi9"
    assert convert_main(["--src", str(src), "--dst", str(dst), "--unet-in-channels", "9"]) == 0
    # The source's DDIM config is outdated (steps_offset 0, clip_sample true): diffusers corrects it
    # when it loads the folder into a StableDiffusionPipeline, and so does the converter.
    assert json.loads((src / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is True
    sched = json.loads((dst / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["steps_offset"], sched["clip_sample"], sched["beta_schedule"]) == (1, False, "scaled_linear")
    ours = JeDiPipeline.from_pretrained(dst, max_references=0)
    ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    assert isinstance(ref.scheduler, DDIMScheduler)
    # the test tokenizer names no model_max_length; both pipelines pad to the text encoder's positions
    ref.tokenizer.model_max_length = ref.text_encoder.config.max_position_embeddings
    assert ours.max_length == ref.tokenizer.model_max_length
    prompt, steps, scale, seed = "a photo of the dog on the beach", 4, 3.0, 7
    out = ours([prompt], [], num_inference_steps=steps, guidance_scale=scale, seed=seed)
    size = ours.resolution
    latent = (1, 1, size // 2, size // 2, 4)  # (B, N, h, w, C): the pipeline's x_T, drawn as it draws it
    x_T = np.asarray(jax.random.normal(jax.random.fold_in(seed_key(seed), 0), latent, jnp.float32))
    with torch.no_grad():
        theirs = ref(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=scale,
                     latents=torch.from_numpy(x_T[0].transpose(0, 3, 1, 2)), output_type="np").images[0]
    mine = np.asarray(out.images[0], np.float32)
    err = np.abs(mine - theirs * 255.0)
    print(f"\nN=1 vs StableDiffusionPipeline: max {err.max():.2f} mean {err.mean():.3f} levels")
    assert err.max() <= 1.5 and theirs.std() > 0.02  # uint8 rounding; a non-constant image
    # the control: another seed gives another image, far beyond that tolerance
    other = np.asarray(ours([prompt], [], num_inference_steps=steps, guidance_scale=scale, seed=seed + 1).images[0],
                       np.float32)
    assert np.abs(other - theirs * 255.0).max() > 10


def test_only_outdated_stable_diffusion_scheduler_configs_are_corrected(tmp_path):
    from jedi_jax.convert.pipeline_folder import stable_diffusion_scheduler_fixes

    def folder(cls, **sched):
        root = tmp_path / f"{cls}{len(list(tmp_path.iterdir()))}"
        (root / "scheduler").mkdir(parents=True)
        (root / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
        return root

    sd15 = {"_class_name": "PNDMScheduler", "steps_offset": 1, "clip_sample": False, "skip_prk_steps": True}
    assert stable_diffusion_scheduler_fixes(folder("StableDiffusionPipeline", **sd15)) is None  # SD 1.5 as shipped
    config, notes = stable_diffusion_scheduler_fixes(folder("StableDiffusionPipeline", _class_name="DDIMScheduler"))
    assert (config["steps_offset"], config["clip_sample"]) == (1, False) and len(notes) == 2  # absent: DDIM defaults
    config, notes = stable_diffusion_scheduler_fixes(folder("StableDiffusionPipeline", _class_name="PNDMScheduler"))
    assert config["steps_offset"] == 1 and "clip_sample" not in config  # PNDM does not clip
    assert stable_diffusion_scheduler_fixes(folder("StableDiffusionXLPipeline", _class_name="DDIMScheduler")) is None


def test_overwrite_replaces_only_an_earlier_model_folder(diffusers_dir, converted, tmp_path, capsys):
    # `--dst runs --overwrite` must not take a folder of runs with it: only an earlier output goes
    runs = tmp_path / "runs"
    (runs / "a_run").mkdir(parents=True)
    err = _cli_error(capsys, ["--src", str(diffusers_dir[0]), "--dst", str(runs), "--overwrite"])
    assert "has no jedi_model.json" in err and (runs / "a_run").is_dir()
    err = _cli_error(capsys, ["--export-diffusers", "--src", str(converted), "--dst", str(runs), "--overwrite"])
    assert "has no model_index.json" in err and (runs / "a_run").is_dir()
    again = tmp_path / "again"
    shutil.copytree(converted, again)  # an earlier conversion: replaced
    assert convert_main(["--src", str(diffusers_dir[0]), "--dst", str(again), "--overwrite"]) == 0


# --- what a converted folder needs besides the weights ---------------------------------------------

@pytest.mark.parametrize("removed, message", [
    (["tokenizer"], "lacks tokenizer/ (the tokenizer of text_encoder/): "),
    (["scheduler"], "lacks scheduler/ (the noise schedule of unet/): "),
    (["tokenizer", "scheduler"], "lacks tokenizer/ (the tokenizer of text_encoder/) and scheduler/ (the noise "
                                 "schedule of unet/): the converted folder would be unusable without them"),
    (["scheduler/scheduler_config.json"], "lacks scheduler/ (the noise schedule of unet/)"),
    (["tokenizer", "model_index.json"], "lacks tokenizer/ (the tokenizer of text_encoder/)"),  # found by names
])
def test_pipeline_folder_without_tokenizer_or_scheduler_is_refused(diffusers_dir, tmp_path, capsys, removed, message):
    """A text encoder is garbage through another vocabulary and a UNet cannot sample without its
    noise schedule: a converted folder without them would be refused by sampling, and training
    would pair the text encoder with the packaged mini-world tokenizer. Refused before anything is
    written."""
    src = _copy(diffusers_dir[0], tmp_path)
    for rel in removed:
        (shutil.rmtree if (src / rel).is_dir() else os.unlink)(src / rel)
    err = _cli_error(capsys, ["--src", str(src), "--dst", str(tmp_path / "out")])
    assert message in err and str(src) in err, err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_component_subsets_need_no_tokenizer_or_scheduler(diffusers_dir, converted, tmp_path, capsys):
    """A folder holding only some components converts without tokenizer/ or scheduler/ where none
    of them needs one (a VAE alone, a UNet alone, a UNet and its VAE), but a model_index.json that
    lists a tokenizer or scheduler must find it."""
    src = diffusers_dir[0]
    for subset in (("vae",), ("unet", "vae")):
        part = tmp_path / "_".join(subset)
        for name in subset:
            shutil.copytree(src / name, part / name)
        assert convert_main(["--src", str(part), "--dst", str(tmp_path / f"{part.name}_jax")]) == 0
        assert sorted(p.name for p in (tmp_path / f"{part.name}_jax").iterdir()) == ["jedi_model.json", *subset]
    (part / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    err = _cli_error(capsys, ["--src", str(part), "--dst", str(tmp_path / "out")])
    assert "lacks scheduler/ (listed in model_index.json)" in err, err


def test_model_folder_problems_are_named_alike_by_every_tool(converted, tmp_path, capsys):
    """A path that is no model folder: every tool (read_model_index -> sample, average, loading;
    the eval CLIs' --model) says the same line: a missing folder does not exist, a training run's
    --workdir is exported first (the command given), another folder is converted first."""
    from jedi_jax.convert.pipeline_folder import read_model_index
    from jedi_jax.eval.cli import cli_model
    from jedi_jax.train.average import main as average_main

    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints" / "100").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    expected = {
        tmp_path / "nowhere": f"no model at {tmp_path / 'nowhere'}: the folder does not exist",
        run: f"{run} is a training run (it has checkpoints/), not a model folder (no jedi_model.json); export it "
             f"first: python -m jedi_jax.train.export --workdir {run} --dst DIR",
        tmp_path / "plain": f"{tmp_path / 'plain'} is not a jedi_jax model folder (no jedi_model.json); convert a "
                            "diffusers folder first: python -m jedi_jax.convert --src DIFFUSERS_DIR --dst DIR",
    }
    for folder, line in expected.items():
        with pytest.raises(ConversionError) as e:
            read_model_index(folder)
        assert str(e.value) == line
        assert cli_model(str(folder)) is None
        assert capsys.readouterr().err == f"error: {line}\n"
        assert average_main(["--models", str(converted), str(folder), "--dst", str(tmp_path / "soup")]) == 2
        assert line in capsys.readouterr().err
    assert cli_model(str(converted)) == converted and not (tmp_path / "soup").exists()


def test_existing_destination_names_the_overwrite_flag(diffusers_dir, converted, capsys):
    err = _cli_error(capsys, ["--src", str(diffusers_dir[0]), "--dst", str(converted)])
    assert "already exists (--overwrite replaces it; from Python, overwrite=True)" in err, err
