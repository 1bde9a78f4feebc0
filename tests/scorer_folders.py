"""Tiny random Hugging Face folders of DreamBench's scorers, written by transformers' own
`save_pretrained` (test_image_text_embedders, test_dreambench; session fixtures in conftest.py)."""
import json
from pathlib import Path

import torch
import transformers

from jedi_jax.models.tokenizer import write_test_tokenizer
from torch_reference import has_defaults, perturb_

SIZE, PATCH = 32, 8  # images of 32x32 in 4x4 patches of 8
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
PROMPTS = ["a photo of sks dog", "a sks dog on the beach", "a red cube", "the cat"]
ODD_SIZES = [(45, 37), (37, 60), (32, 32), (100, 33), (20, 26)]  # the last is upscaled


def write_clip_folder(folder: Path):
    """A tiny CLIPModel folder as openai/clip-vit-large-patch14 has it: config, safetensors, the legacy
    preprocessor_config.json (int sizes, CLIPFeatureExtractor), tokenizer files. Returns (folder, torch model)."""
    vocab = write_test_tokenizer(folder, sorted({w for p in PROMPTS for w in p.split()}))
    n = len(vocab)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(TINY, vocab_size=n, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1, hidden_act="quick_gelu"),
        vision_config=dict(TINY, image_size=SIZE, patch_size=PATCH, hidden_act="quick_gelu"), projection_dim=16)
    model = perturb_(transformers.CLIPModel(config).eval(), seed=0)
    assert not has_defaults(model)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": SIZE}))
    return folder, model


def write_dino_folder(folder: Path):
    """A tiny ViTModel folder as facebook/dino-vits16 has it (pooler weights included, its legacy
    preprocessor_config.json), its safetensors in shards with an index. Returns (folder, torch model)."""
    torch.manual_seed(1)
    config = transformers.ViTConfig(**TINY, image_size=SIZE, patch_size=PATCH)  # gelu, eps 1e-12: dino-vits16's
    model = perturb_(transformers.ViTModel(config, add_pooling_layer=True).eval(), seed=1)
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": SIZE}))
    return folder, model
