"""CLIP text encoder parity: our Flax `CLIPTextModel` / `CLIPTextModelWithProjection` vs
random-initialized transformers models (float32), weights through the generic converter.

Also: the hermetic test tokenizer (`write_test_tokenizer`) and real prompts through both encoders
with the SD1 / SD2 (clip_skip) / SDXL prompt-embedding rules of diffusers' pipelines.
"""
import time

import jax
import numpy as np
import pytest
import torch
import transformers

from jedi_jax.convert.torch_naming import torch_to_params
from jedi_jax.models.clip_text import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, pooled_text_embeds,
                                       prompt_embeddings)
from jedi_jax.models.functional import Functional
from jedi_jax.models.tokenizer import CachedTokenize, load_tokenizer, tokenize, write_test_tokenizer
from torch_reference import has_defaults, perturb_

TOL = 1e-4
VOCAB = 100
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=16, projection_dim=24)
CONFIGS = {
    # SD1.x style (openai/clip-vit-large-patch14 config.json): quick_gelu, legacy eos_token_id=2 -> argmax pooling.
    "quick_gelu_eos2": dict(SMALL, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # SD2 / SDXL-2 style: gelu, eos = the highest id (49407-style) -> first-eos pooling; pad differs from eos.
    "gelu_eos_last": dict(SMALL, hidden_act="gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0,
                          layer_norm_eps=1e-5),
}
PROMPTS = ["a photo of sks dog", "a sks dog on the beach", "the cat", "a photo of a cat and a dog on the beach at night"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})


def _ids(rng, b, t, bos, eos, pad, lengths):
    """Tokenizer-like rows: bos, random tokens (never bos/eos), eos, pad... ; returns ids, mask."""
    ids = np.full((b, t), pad, np.int64)
    mask = np.zeros((b, t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0] = bos
        ids[i, 1:n + 1] = rng.integers(3, VOCAB - 2, size=n)
        ids[i, n + 1] = eos
        mask[i, :n + 2] = 1
    return ids, mask


def _convert(ref, model_cls, cfg, prefix=""):
    fm = Functional.abstract(lambda r: model_cls(cfg, rngs=r))
    tensors = {prefix + k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return fm, torch_to_params(tensors, fm.param_shapes(), what="text_encoder")


def _torch_model(kwargs, with_projection=False, seed=0):
    torch.manual_seed(seed)
    tcfg = transformers.CLIPTextConfig(**kwargs)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    ref = perturb_(cls(tcfg).eval(), seed)  # LayerNorms and the (zero-initialized) biases off their defaults
    assert not has_defaults(ref)
    cfg = CLIPTextConfig.from_transformers(tcfg.to_dict())
    # transformers 5's CLIPTextModel state dict has no "text_model." prefix; checkpoint files do.
    fm, params = _convert(ref, CLIPTextModelWithProjection if with_projection else CLIPTextModel, cfg,
                          prefix="" if with_projection else "text_model.")
    return ref, cfg, fm, params


def _run(fm, params, ids, mask=None):
    f = jax.jit(lambda p, i, m: fm.bind(p)(i, attention_mask=m, output_hidden_states=True))
    return f(params, ids.astype(np.int32), None if mask is None else mask.astype(np.int32))


def _errs(ours, theirs, with_projection=False):
    e = {
        "last_hidden_state": np.abs(np.asarray(ours.last_hidden_state) - theirs.last_hidden_state.numpy()).max(),
        "hidden_states": max(np.abs(np.asarray(a) - b.numpy()).max() for a, b in zip(ours.hidden_states, theirs.hidden_states)),
    }
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    if with_projection:
        e["text_embeds"] = np.abs(np.asarray(ours.text_embeds) - theirs.text_embeds.numpy()).max()
    else:
        e["pooler_output"] = np.abs(np.asarray(ours.pooler_output) - theirs.pooler_output.numpy()).max()
    return {k: float(v) for k, v in e.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("use_mask", [False, True])
def test_clip_text_parity(name, use_mask):
    t0 = time.perf_counter()
    kwargs = CONFIGS[name]
    ref, cfg, fm, params = _torch_model(kwargs)
    assert cfg.hidden_act == kwargs["hidden_act"] and cfg.eos_token_id == kwargs["eos_token_id"]
    rng = np.random.default_rng(1)
    ids, mask = _ids(rng, 3, 16, kwargs["bos_token_id"], kwargs["eos_token_id"], kwargs["pad_token_id"], [3, 14, 7])
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None,
                     output_hidden_states=True)
    ours = _run(fm, params, ids, mask if use_mask else None)
    errs = _errs(ours, theirs)
    print(f"\n[clip {name} mask={use_mask}] max abs err {errs} ({time.perf_counter() - t0:.1f}s)")
    assert ours.last_hidden_state.shape == (3, 16, 64) and len(ours.hidden_states) == 4
    assert all(e <= TOL for e in errs.values()), errs
    if use_mask:  # the padding mask matters (at padded query positions only: the mask is also causal)
        plain = np.asarray(_run(fm, params, ids).last_hidden_state)
        masked = np.asarray(ours.last_hidden_state)
        real = mask.astype(bool)
        np.testing.assert_allclose(masked[real], plain[real], atol=1e-6)
        assert np.abs(masked[~real] - plain[~real]).max() > 1e-3


def test_clip_text_with_projection_parity():
    t0 = time.perf_counter()
    kwargs = CONFIGS["gelu_eos_last"]
    ref, cfg, fm, params = _torch_model(kwargs, with_projection=True)
    assert set(params) == {"text_model", "text_projection"} and "bias" not in params["text_projection"]
    ids, _ = _ids(np.random.default_rng(2), 2, 16, kwargs["bos_token_id"], kwargs["eos_token_id"],
                  kwargs["pad_token_id"], [5, 9])
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids), output_hidden_states=True)
    ours = _run(fm, params, ids)
    errs = _errs(ours, theirs, with_projection=True)
    print(f"\n[clip with projection] max abs err {errs} ({time.perf_counter() - t0:.1f}s)")
    assert ours.text_embeds.shape == (2, 24)
    assert all(e <= TOL for e in errs.values()), errs


def test_clip_config_round_trip():
    for kwargs in CONFIGS.values():
        tcfg = transformers.CLIPTextConfig(**kwargs)
        cfg = CLIPTextConfig.from_transformers(tcfg.to_dict())
        back = transformers.CLIPTextConfig(**cfg.to_transformers())
        assert CLIPTextConfig.from_transformers(back.to_dict()) == cfg
        assert {k: getattr(back, k) for k in kwargs} == kwargs
    full = transformers.CLIPConfig(text_config=CONFIGS["gelu_eos_last"]).to_dict()
    assert CLIPTextConfig.from_transformers(full).hidden_act == "gelu"
    assert CLIPTextConfig.from_transformers({}) == CLIPTextConfig()
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_transformers({"hidden_act": "relu"})


def test_test_tokenizer_one_token_per_word(tmp_path):
    vocab = write_test_tokenizer(tmp_path, WORDS + ["at", "ca", "catalog"])
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id == vocab["<|startoftext|>"] == len(vocab) - 2
    assert tok.eos_token_id == vocab["<|endoftext|>"] == len(vocab) - 1
    for w in WORDS + ["at", "ca", "catalog"]:
        assert tok(w)["input_ids"] == [tok.bos_token_id, vocab[w + "</w>"], tok.eos_token_id], w
    ids = tokenize(tok, ["A photo of SKS dog", "zebra"], max_length=10)
    assert ids.dtype == np.int32 and ids.shape == (2, 10)
    words = ["a", "photo", "of", "sks", "dog"]
    assert ids[0].tolist() == [tok.bos_token_id] + [vocab[w + "</w>"] for w in words] + [tok.eos_token_id] * 4
    assert ids[1, -1] == tok.eos_token_id  # unknown word falls back to byte symbols
    long = tokenize(tok, [" ".join(["dog"] * 20)], max_length=8)[0]  # truncation keeps eos last
    assert long.tolist() == [tok.bos_token_id] + [vocab["dog</w>"]] * 6 + [tok.eos_token_id]



def test_cached_tokenize_equals_tokenize(tmp_path):
    write_test_tokenizer(tmp_path, WORDS)
    tok = load_tokenizer(tmp_path)
    prompts = ["a photo of sks dog", "zebra", "a photo of sks dog", "dog dog", "zebra"]
    cached = CachedTokenize(tok, max_length=10, max_entries=2)
    for _ in range(2):  # cold, then from the memo (which is full at 2 entries: the third is recomputed)
        np.testing.assert_array_equal(cached(prompts), tokenize(tok, prompts, max_length=10))
    assert len(cached._rows) == 2
    assert cached("zebra").shape == (1, 10) and cached([]).shape == (0, 10)

def test_real_prompts_through_both_encoders(tmp_path):
    """SD1 (last), SD2/clip_skip (penultimate + final LN) and SDXL (penultimate, no LN; pooled text_embeds)."""
    t0 = time.perf_counter()
    vocab = write_test_tokenizer(tmp_path, WORDS)
    tok = load_tokenizer(tmp_path)
    ids = tokenize(tok, PROMPTS, max_length=16)
    n = len(vocab)
    base = dict(SMALL, vocab_size=n, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1)
    enc1, cfg1, fm1, p1 = _torch_model(dict(base, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1))
    enc2, cfg2, fm2, p2 = _torch_model(dict(base, hidden_act="gelu", pad_token_id=n - 1), with_projection=True, seed=1)
    with torch.no_grad():
        t_ids = torch.from_numpy(ids.astype(np.int64))
        o1 = enc1(t_ids, output_hidden_states=True)
        o2 = enc2(t_ids, output_hidden_states=True)
        sd1 = o1.last_hidden_state.numpy()  # StableDiffusionPipeline, clip_skip=None
        skip1 = enc1.final_layer_norm(o1.hidden_states[-2]).numpy()  # StableDiffusionPipeline, clip_skip=1
        xl = np.concatenate([o1.hidden_states[-2].numpy(), o2.hidden_states[-2].numpy()], -1)  # SDXL encode_prompt
        xl_pooled = o2.text_embeds.numpy()
        pooled2 = enc2.text_model(t_ids).pooler_output.numpy()
    ours1, ours2 = _run(fm1, p1, ids), _run(fm2, p2, ids)
    lnorm = fm1.bind(p1).text_model.final_layer_norm
    errs = {
        "sd1_last": np.abs(np.asarray(prompt_embeddings(ours1, "last")) - sd1).max(),
        "clip_skip1": np.abs(np.asarray(prompt_embeddings(ours1, "penultimate", True, final_layer_norm=lnorm)) - skip1).max(),
        "sdxl_context": np.abs(np.concatenate([np.asarray(prompt_embeddings(o, "penultimate")) for o in (ours1, ours2)], -1)
                               - xl).max(),
        "sdxl_pooled": np.abs(np.asarray(pooled_text_embeds(ours2)) - xl_pooled).max(),
        "pooler_eos2": np.abs(np.asarray(ours1.pooler_output) - o1.pooler_output.numpy()).max(),
        "pooler_eos_last": np.abs(np.asarray(ours2.pooler_output) - pooled2).max(),
    }
    errs = {k: float(v) for k, v in errs.items()}
    print(f"\n[clip real prompts] max abs err {errs} ({time.perf_counter() - t0:.1f}s)")
    assert all(e <= TOL for e in errs.values()), errs
    np.testing.assert_array_equal(np.asarray(prompt_embeddings(ours1, "last", False)), np.asarray(ours1.hidden_states[-1]))
    with pytest.raises(ValueError, match="final_layer_norm"):
        prompt_embeddings(ours1, "penultimate", True)
    # "embeddings": the final LN of the token + position embeddings (torch's hidden_states[0]); no
    # token sees another, so a prompt that differs only later leaves the earlier vectors unchanged
    emb = np.asarray(prompt_embeddings(ours1, "embeddings", final_layer_norm=lnorm))
    with torch.no_grad():
        np.testing.assert_allclose(emb, enc1.final_layer_norm(o1.hidden_states[0]).numpy(), atol=TOL)
    first, second = ids[0], ids[0].copy()
    second[-1] = ids[1][1]  # change the last position's token only
    other = _run(fm1, p1, np.stack([first, second]))
    e2 = np.asarray(prompt_embeddings(other, "embeddings", final_layer_norm=lnorm))
    np.testing.assert_array_equal(e2[0, :-1], e2[1, :-1])
    assert np.abs(e2[0, -1] - e2[1, -1]).max() > 1e-3
