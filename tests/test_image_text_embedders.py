"""DreamBench's embedders (eval.image_text_embedders, models.vit) against transformers at the same random
weights, float32: tiny `CLIPModel` and `ViTModel` folders written by `save_pretrained`, loaded by our
scorers; the models alone, and the whole path from uint8 images of odd sizes through the PIL image
processors. Also: strict loading (an extra, a missing, a mis-shaped tensor; no config.json) and
invariants (identical images have cosine 1, embeddings have unit norm, batching changes nothing).
"""
import json
import shutil
import time

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jedi_jax.convert.components import read_safetensors
from jedi_jax.convert.torch_naming import ConversionError
from jedi_jax.eval.image_text_embedders import ClipScorer, DinoScorer
from jedi_jax.models.tokenizer import tokenize, write_test_tokenizer
from scorer_folders import ODD_SIZES, PROMPTS, SIZE, TINY

TOL = 1e-5


def _images(seed, sizes=ODD_SIZES):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_clip_parity(clip_folder):
    t0 = time.perf_counter()
    folder, ref = clip_folder
    scorer = ClipScorer.from_folder(folder, batch_size=4)
    pixels = np.random.default_rng(0).normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)  # NHWC
    ours = jax.jit(lambda p, x: scorer.vision.bind(p)(x))(scorer.vision_params, pixels)
    ids = tokenize(scorer.tokenizer, PROMPTS, 16)
    ours_text = jax.jit(lambda p, i: scorer.text.bind(p)(i).text_embeds)(scorer.text_params, ids)
    with torch.no_grad():
        theirs = ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
        theirs_text = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output
        # the whole path: uint8 images of odd sizes through CLIP's image processor (legacy config) and the tokenizer
        processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
        images = _images(1)
        pixel_values = processor(images=images, return_tensors="np")["pixel_values"]  # (n, 3, 32, 32)
        tokens = scorer.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        out = ref(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                  pixel_values=torch.from_numpy(pixel_values))
    ours_pixels = np.stack([scorer.preprocess(im) for im in images])
    errs = {"image_embeds": _err(ours, theirs), "text_embeds": _err(ours_text, theirs_text),
            "preprocess": _err(ours_pixels.transpose(0, 3, 1, 2), pixel_values),
            "full_image": _err(scorer.image_embeds(np.stack([images[2]] * 2))[0], out.image_embeds[2]),
            "full_text": _err(scorer.text_embeds(PROMPTS), out.text_embeds)}
    assert ours.shape == (3, 16) and ours_text.shape == (4, 16)
    print(f"\n[clip] max abs err {errs} ({time.perf_counter() - t0:.1f}s)")
    assert all(e <= TOL for e in errs.values()), errs
    # odd sizes in one batch (5 images in rows of 4): each row as the processor + torch model give it
    errs = _err(np.concatenate([scorer.image_embeds(np.stack([im])) for im in images]), out.image_embeds)
    assert errs <= TOL, errs


def test_dino_parity(dino_folder):
    t0 = time.perf_counter()
    folder, ref = dino_folder
    scorer = DinoScorer.from_folder(folder, batch_size=4)
    pixels = np.random.default_rng(2).normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    ours = jax.jit(lambda p, x: scorer.functional.bind(p)(x))(scorer.params, pixels)  # (B, T, D)
    images = _images(3)
    processor = transformers.ViTImageProcessorPil.from_pretrained(folder)
    pixel_values = processor(images=images, return_tensors="np")["pixel_values"]  # (n, 3, 32, 32)
    with torch.no_grad():
        theirs = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
        cls = ref(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state[:, 0]
    cls = cls / cls.norm(dim=-1, keepdim=True)
    full = np.concatenate([scorer.image_embeds(np.stack([im])) for im in images])
    errs = {"last_hidden_state": _err(ours, theirs), "cls": _err(np.asarray(ours)[:, 0], theirs[:, 0]),
            "preprocess": _err(np.stack([scorer.preprocess(im) for im in images]).transpose(0, 3, 1, 2), pixel_values),
            "full_image": _err(full, cls)}
    print(f"\n[dino] max abs err {errs} ({time.perf_counter() - t0:.1f}s)")
    assert ours.shape == (3, 17, 32)
    assert all(e <= TOL for e in errs.values()), errs


def test_invariants(clip_folder, dino_folder):
    clip = ClipScorer.from_folder(clip_folder[0], batch_size=4)
    dino = DinoScorer.from_folder(dino_folder[0], batch_size=4)
    a, b, c = _images(4, [(40, 50), (33, 61), (64, 64)])
    batch = np.stack([a, a, np.zeros_like(a), np.full_like(a, 255), a, a])  # 6 rows: one of 4, one of 2 (padded)
    for scorer in (clip, dino):
        e = scorer.image_embeds(batch)
        assert e.dtype == np.float32 and e.shape == (6, scorer.dim)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-6)
        np.testing.assert_allclose(e[[0, 0, 0]] @ e[[1, 4, 5]].T, 1, atol=1e-6)  # identical images: cosine 1
        np.testing.assert_allclose(scorer.image_embeds(a[None])[0], e[0], atol=1e-6)  # batching changes nothing
        assert scorer.image_embeds(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, scorer.dim)
        for other in (b, c):
            assert np.abs(scorer.image_embeds(other[None])[0] - e[0]).max() > 1e-3
        with pytest.raises(ValueError, match="uint8"):
            scorer.image_embeds(batch.astype(np.float32))
    t = clip.text_embeds(PROMPTS + PROMPTS[:1])
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(t[0] @ t[-1], 1, atol=1e-6)
    assert clip.text_embeds([]).shape == (0, clip.dim)


def _edited(src, dst, case, key):
    """A copy of the folder `src` with its tensors in one model.safetensors, `key` added, deleted or mis-shaped."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.safetensors*"))
    tensors = read_safetensors(src, "model")
    if case == "extra":
        tensors[key] = np.zeros(3, np.float32)
    elif case == "missing":
        del tensors[key]
    else:
        tensors[key] = np.zeros(tensors[key].shape[:-1] + (tensors[key].shape[-1] + 1,), np.float32)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("kind, case, key", [
    ("clip", "extra", "vision_model.encoder.layers.0.extra.weight"),
    ("clip", "missing", "vision_model.post_layernorm.weight"),
    ("clip", "missing", "vision_model.embeddings.class_embedding"),  # a bare nn.Parameter
    ("clip", "wrong shape", "visual_projection.weight"),
    ("clip", "wrong shape", "vision_model.embeddings.class_embedding"),
    ("clip", "missing", "text_projection.weight"),
    ("clip", "extra", "text_model.extra.bias"),
    ("dino", "extra", "layernorm.extra"),
    ("dino", "missing", "embeddings.cls_token"),
    ("dino", "missing", "layernorm.bias"),
    ("dino", "wrong shape", "embeddings.position_embeddings"),
    ("dino", "wrong shape", "encoder.layer.1.attention.attention.query.weight"),
])
def test_strict_loading(request, tmp_path, kind, case, key):
    """One ConversionError line naming the key; the shipped files load (the parity tests)."""
    folder = _edited(request.getfixturevalue(f"{kind}_folder")[0], tmp_path / kind, case, key)
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")) as e:
        {"clip": ClipScorer, "dino": DinoScorer}[kind].from_folder(folder)
    assert {"extra": "unexpected", "missing": "missing", "wrong shape": "shape"}[case] in str(e.value)
    assert "\n" not in str(e.value)


def test_folder_errors(clip_folder, dino_folder, tmp_path):
    shutil.copytree(dino_folder[0], tmp_path / "dino")
    (tmp_path / "dino" / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json"):
        DinoScorer.from_folder(tmp_path / "dino")
    with pytest.raises(ConversionError, match="model_type is 'clip', expected 'vit'"):
        DinoScorer.from_folder(clip_folder[0])
    with pytest.raises(ConversionError, match="is not a folder"):
        ClipScorer.from_folder(tmp_path / "nowhere")
    folder = shutil.copytree(clip_folder[0], tmp_path / "clip")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="only pytorch_model.bin"):
        ClipScorer.from_folder(folder)
    shutil.copytree(clip_folder[0], tmp_path / "clip448", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    (tmp_path / "clip448" / "preprocessor_config.json").write_text(json.dumps({"size": 448, "crop_size": 448}))
    with pytest.raises(ConversionError, match="interpolation"):
        ClipScorer.from_folder(tmp_path / "clip448")
    (tmp_path / "clip448" / "preprocessor_config.json").unlink()  # no preprocessor config: CLIP's at the model's size
    assert ClipScorer.from_folder(tmp_path / "clip448").preprocess.crop == (SIZE, SIZE)


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_default_preprocessing_at_224(kind, tmp_path):
    """No preprocessor_config.json: transformers' processor defaults at the real models' geometry (224, CLIP's
    patch 14, DINO's 16): our preprocessing equals CLIPImageProcessorPil() / ViTImageProcessorPil() exactly."""
    torch.manual_seed(2)
    small = dict(TINY, num_hidden_layers=1, image_size=224)
    if kind == "clip":
        vocab = write_test_tokenizer(tmp_path, ["dog"])
        config = transformers.CLIPConfig(text_config=dict(TINY, vocab_size=len(vocab), max_position_embeddings=8),
                                         vision_config=dict(small, patch_size=14), projection_dim=16)
        ref, scorer_cls = transformers.CLIPModel(config).eval(), ClipScorer
        processor = transformers.CLIPImageProcessorPil()
    else:
        ref = transformers.ViTModel(transformers.ViTConfig(**small, patch_size=16), add_pooling_layer=False).eval()
        scorer_cls, processor = DinoScorer, transformers.ViTImageProcessorPil()
    ref.save_pretrained(tmp_path)
    scorer = scorer_cls.from_folder(tmp_path)
    images = _images(5, [(300, 257), (180, 400), (224, 224), (97, 131)])
    pixel_values = processor(images=images, return_tensors="np")["pixel_values"]  # (4, 3, 224, 224)
    ours = np.stack([scorer.preprocess(im) for im in images]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, pixel_values)
    with torch.no_grad():
        if kind == "clip":
            theirs = ref.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output
        else:
            theirs = ref(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state[:, 0]
    theirs = (theirs / theirs.norm(dim=-1, keepdim=True)).numpy()
    full = np.concatenate([scorer.image_embeds(im[None]) for im in images])
    assert _err(full, theirs) <= TOL, _err(full, theirs)


def test_preprocessor_config_errors():
    from jedi_jax.eval.image_text_embedders import CLIP_PROCESSOR, VIT_PROCESSOR, ImagePreprocess

    def load(d, defaults=CLIP_PROCESSOR, square=False):
        return ImagePreprocess.from_config(d, defaults, image_size=SIZE, default_to_square=square)

    assert load({}).shortest_edge == SIZE and load({"size": {"height": SIZE, "width": SIZE}}).size == (SIZE, SIZE)
    assert load({"size": SIZE}, VIT_PROCESSOR, square=True).size == (SIZE, SIZE)
    assert load({"size": {"height": 40, "width": 50}, "crop_size": {"height": SIZE, "width": SIZE}}).crop == (SIZE,) * 2
    for d, match in [({"size": SIZE, "crop_size": 40}, "larger than the resized image"),
                     ({"size": {"height": 40, "width": 30}, "crop_size": SIZE}, "larger than the resized image"),
                     ({"do_center_crop": False}, "variable-size"),
                     ({"size": {"longest_edge": 40}}, "unsupported size"),
                     ({"resample": "bicubic"}, "preprocessor_config.json: invalid literal"),
                     ({"do_pad": True}, "do_pad")]:
        with pytest.raises(ConversionError, match=match):
            load(d)
