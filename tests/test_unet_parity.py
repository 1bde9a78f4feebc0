"""UNet parity: our Flax `UNet` (N=1 sets) vs a random-initialized diffusers `UNet2DConditionModel`.

Weights go through the generic converter (`torch_to_params`), so this also proves that our
parameter paths are exactly diffusers' state-dict keys. Torch is NCHW, ours NHWC with a set axis
of one member. float32 throughout; DESIGN.md tolerance: max abs error <= 1e-4 on unit-scale outputs.
Layouts: SD 1.x (conv projections, one head count), SD 2.x (linear projections, per-level heads),
SDXL (DownBlock2D first, per-level transformer depth, text_time embedding), JeDi's 9 input
channels at a size that is not a multiple of the downsampling factor, and the exact SD 1.5 UNet.
"""
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from jedi_jax.convert.torch_naming import flatten, torch_key, torch_to_params
from jedi_jax.models.functional import Functional
from jedi_jax.models.unet import UNet, UNetConfig
from torch_reference import has_defaults, perturb_

TOL = 1e-4

SD15 = {  # runwayml/stable-diffusion-v1-5 unet/config.json, written out literally
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

# name -> (diffusers kwargs, latent (h, w), text tokens T)
TINY = {
    "sd1": (dict(block_out_channels=[32, 64, 64], layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,
                 norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]), (16, 16), 7),
    "sd2": (dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=24, attention_head_dim=[2, 4],
                 norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]), (12, 16), 9),
    "sdxl": (dict(block_out_channels=[32, 64, 64], layers_per_block=2, cross_attention_dim=32,
                  attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3], norm_num_groups=8,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=20 + 6 * 8,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]), (16, 16), 6),
    "jedi_9ch_odd_size": (dict(block_out_channels=[32, 64], layers_per_block=1, in_channels=9, cross_attention_dim=16,
                               attention_head_dim=2, norm_num_groups=8,
                               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), (9, 11), 5),
}


def _lean_device_put(tree):
    """numpy tree -> jax arrays leaf by leaf, dropping each numpy leaf as soon as it is copied."""
    for key in list(tree):
        if isinstance(tree[key], dict):
            _lean_device_put(tree[key])
        else:
            tree[key] = jnp.asarray(tree.pop(key))
    return tree


def _run_parity(name, kwargs, hw, T, seed=0):
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ref_model = perturb_(UNet2DConditionModel(**kwargs).eval(), seed)  # norms and biases off (1, 0)
    assert not has_defaults(ref_model)
    cfg = UNetConfig.from_diffusers(dict(ref_model.config))  # what the converter reads from config.json
    fm = Functional.abstract(lambda r: UNet(cfg, rngs=r))

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, cfg.in_channels, *hw)).astype(np.float32)  # NCHW
    ctx = rng.standard_normal((1, T, cfg.cross_attention_dim[0])).astype(np.float32)
    t = np.array([537], np.int64)
    torch_kw, added = {}, None
    if cfg.addition_embed_type == "text_time":
        P = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        text_embeds = rng.standard_normal((1, P)).astype(np.float32)
        time_ids = np.array([[1024, 768, 16, 32, 1024, 1024]], np.float32)
        torch_kw = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(text_embeds),
                                          "time_ids": torch.from_numpy(time_ids)}}
        added = {"text_embeds": jnp.asarray(text_embeds)[:, None], "time_ids": jnp.asarray(time_ids)[:, None]}
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **torch_kw).sample.numpy()

    tensors = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    params = torch_to_params(tensors, fm.param_shapes(), what="unet")
    del ref_model, tensors
    gc.collect()
    params = _lean_device_put(params)

    apply = jax.jit(lambda p, *a: fm.bind(p)(*a))
    out = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1))[:, None], jnp.asarray(t), jnp.asarray(ctx)[:, None],
                None, added)  # (1, 1, h, w, C)
    out = np.asarray(out)[:, 0].transpose(0, 3, 1, 2)  # NCHW
    del params
    err = float(np.abs(out - ref).max())
    print(f"\n[unet parity] {name}: latent {hw}, output std {ref.std():.3f}, max|ref| {np.abs(ref).max():.3f}, "
          f"max abs err {err:.2e} ({time.perf_counter() - t0:.1f}s)")
    assert out.shape == ref.shape
    assert 0.05 < ref.std() < 20  # unit-scale, non-trivial
    assert err <= TOL, f"{name}: max abs err {err:.3e} > {TOL}"
    return cfg


@pytest.mark.parametrize("name", list(TINY))
def test_unet_parity_tiny(name):
    kwargs, hw, T = TINY[name]
    cfg = _run_parity(name, kwargs, hw, T)
    # the config we write back builds the same torch architecture
    d = cfg.to_diffusers()
    assert UNetConfig.from_diffusers(d) == cfg
    with torch.device("meta"):
        a = UNet2DConditionModel(**kwargs).state_dict()
        b = UNet2DConditionModel(**d).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.slow
def test_unet_parity_sd15_exact():
    """The exact SD 1.5 UNet architecture (random weights, ~860M params), 16x16 latent, batch 1."""
    cfg = _run_parity("sd15_exact", SD15, (16, 16), 77)
    assert cfg.num_heads == (8, 8, 8, 8) and cfg.cross_attention_dim == (768,) * 4


def _torch_shapes_via_meta(d: dict) -> dict:
    with torch.device("meta"):
        sd = UNet2DConditionModel(**{k: v for k, v in d.items() if not k.startswith("_")}).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def _our_shapes_in_torch_layout(cfg: UNetConfig) -> dict:
    out = {}
    for path, s in flatten(Functional.abstract(lambda r: UNet(cfg, rngs=r)).param_shapes()).items():
        shape = tuple(s.shape)
        if path[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        out[torch_key(path)] = shape
    return out


@pytest.mark.parametrize("name,d,n_params", [("sd15", SD15, 859_520_964), ("sd21", SD21, 865_910_724),
                                             ("sdxl", SDXL, 2_567_463_684)])
def test_full_size_layouts_match_diffusers(name, d, n_params):
    """Real SD 1.5 / 2.1 / SDXL configs: every parameter path and shape equals diffusers' (meta tensors)."""
    cfg = UNetConfig.from_diffusers(d)
    ours, theirs = _our_shapes_in_torch_layout(cfg), _torch_shapes_via_meta(d)
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == n_params
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg


def test_config_parsing():
    sd21 = UNetConfig.from_diffusers(SD21)
    assert sd21.num_heads == (5, 10, 20, 20) and sd21.use_linear_projection and sd21.upcast_attention
    xl = UNetConfig.from_diffusers(SDXL)
    assert xl.transformer_layers_per_block == (1, 2, 10) and xl.num_heads == (5, 10, 20)
    assert xl.addition_embed_type == "text_time" and not xl.upcast_attention  # null -> False
    sd15 = UNetConfig.from_diffusers(SD15)
    assert sd15.num_heads == (8, 8, 8, 8) and not sd15.use_linear_projection
    assert UNetConfig.from_diffusers({**SD15, "in_channels": 9}).in_channels == 9
    assert sd15.to_diffusers()["attention_head_dim"] == 8 and sd15.to_diffusers()["sample_size"] == 64
    # built directly the way diffusers takes them (an int for every level, lists): normalized, hashable
    direct = UNetConfig(layers_per_block=2, num_heads=8, cross_attention_dim=768, sample_size=64,
                        block_out_channels=[320, 640, 1280, 1280], down_block_types=list(sd15.down_block_types))
    assert direct == sd15 and hash(direct) == hash(sd15)
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(num_heads=(8, 8))


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("only_cross_attention", True), ("resnet_time_scale_shift", "scale_shift"),
    ("num_attention_heads", 8), ("encoder_hid_dim", 768), ("time_cond_proj_dim", 256), ("dropout", 0.1),
    ("transformer_layers_per_block", [[1, 2], [1, 2], [1, 2], [1, 2]]), ("addition_embed_type", "text"),
    ("down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("norm_num_groups", None), ("act_fn", "gelu"),
    ("some_future_option", 1),
])
def test_config_rejects_unsupported(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers({**SD15, key: value})


def test_sdxl_added_cond_shapes_are_checked():
    """SDXL's text_time conditioning: a width that does not add up to projection_class_embeddings_input_dim,
    or a leading shape that is neither (B,) nor (B, N), is one error naming it (not an XLA dot_general error,
    and a (P,) vector is no longer broadcast to every set)."""
    kwargs = dict(TINY["sdxl"][0])
    cfg = UNetConfig.from_diffusers(kwargs)
    fm = Functional.abstract(lambda r: UNet(cfg, rngs=r))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fm.param_shapes())
    B, N = 2, 3
    x, t, ctx = jnp.zeros((B, N, 8, 8, 4)), jnp.zeros((B,), jnp.int32), jnp.zeros((B, N, 6, 32))
    ok = {"text_embeds": jnp.zeros((B, N, 20)), "time_ids": jnp.zeros((B, 6))}
    assert fm.bind(params)(x, t, ctx, None, ok).shape == (B, N, 8, 8, 4)
    with pytest.raises(ValueError, match=r"20 \+ 5 time_ids x 8 = 60, but .* is 68"):
        fm.bind(params)(x, t, ctx, None, {**ok, "time_ids": jnp.zeros((B, N, 5))})
    with pytest.raises(ValueError, match=r"added_cond\['text_embeds'\] must be \(B, X\) or \(B, N, X\)"):
        fm.bind(params)(x, t, ctx, None, {**ok, "text_embeds": jnp.zeros((20,))})
