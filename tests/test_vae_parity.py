"""VAE parity: our Flax `AutoencoderKL` vs a random-initialized diffusers `AutoencoderKL` (float32).

Weights go through the generic converter (`torch_to_params`), so this also checks that our
parameter paths are exactly diffusers' state-dict keys. Torch is NCHW, ours NHWC.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jedi_jax.convert.torch_naming import torch_to_params
from jedi_jax.models.functional import Functional
from jedi_jax.models.vae import (AutoencoderKL, VAEConfig, kl_divergence, sample_latent, scale_latents,
                                 unscale_latents)
from torch_reference import has_defaults, perturb_

TOL = 1e-4

CONFIGS = {
    # SD-like: 4 levels (f=8), 2 resnets per down block, mid attention, quant convs; small channels.
    "sd_like_4level": (dict(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 64, 64, 64], layers_per_block=2, latent_channels=4, norm_num_groups=8,
        sample_size=32), (32, 32)),
    # 2 levels (f=2), 1 resnet per down block, everything else default.
    "two_level": (dict(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=16), (16, 16)),
    # 2 levels, no mid attention, no (post-)quant conv, 8 latent channels, non-square input.
    "two_level_bare": (dict(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[16, 32], layers_per_block=1, latent_channels=8, norm_num_groups=4,
        sample_size=16, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.5, shift_factor=0.1), (16, 24)),
}


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _build(name):
    kwargs, hw = CONFIGS[name]
    torch.manual_seed(0)
    ref = perturb_(TorchAutoencoderKL(**kwargs).eval())  # norms and biases off their defaults (1, 0)
    assert not has_defaults(ref)
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    fm = Functional.abstract(lambda r: AutoencoderKL(cfg, rngs=r))
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = torch_to_params(tensors, fm.param_shapes(), what="vae")
    return ref, cfg, fm, params, hw


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vae_parity(name):
    t0 = time.perf_counter()
    ref, cfg, fm, params, (h, w) = _build(name)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, 3, h, w)).astype(np.float32)
    f = cfg.downsample_factor
    z = rng.normal(size=(2, cfg.latent_channels, h // f, w // f)).astype(np.float32)

    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        t_mean, t_logvar = _nhwc(post.mean), _nhwc(post.logvar)
        t_dec = _nhwc(ref.decode(torch.from_numpy(z)).sample)
        t_rec = _nhwc(ref(torch.from_numpy(x), sample_posterior=False).sample)

    encode = jax.jit(lambda p, x: fm.bind(p).encode(x))
    decode = jax.jit(lambda p, z: fm.bind(p).decode(z))
    recon = jax.jit(lambda p, x: fm.bind(p)(x))
    x_nhwc, z_nhwc = x.transpose(0, 2, 3, 1), z.transpose(0, 2, 3, 1)
    mean, logvar = encode(params, x_nhwc)
    dec = decode(params, z_nhwc)
    rec = recon(params, x_nhwc)

    errs = {
        "mean": float(np.abs(np.asarray(mean) - t_mean).max()),
        "logvar": float(np.abs(np.asarray(logvar) - t_logvar).max()),
        "decode": float(np.abs(np.asarray(dec) - t_dec).max()),
        "recon": float(np.abs(np.asarray(rec) - t_rec).max()),
    }
    scales = {"mean": np.abs(t_mean).max(), "logvar": np.abs(t_logvar).max(), "decode": np.abs(t_dec).max()}
    print(f"\n[vae {name}] max abs err {errs}  output scale {scales}  ({time.perf_counter() - t0:.1f}s)")
    assert mean.shape == (2, h // f, w // f, cfg.latent_channels) and dec.shape == (2, h, w, 3)
    for k, e in errs.items():
        assert e <= TOL, (k, e)


def test_vae_config_round_trip_and_strictness():
    kwargs, _ = CONFIGS["sd_like_4level"]
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**kwargs)
    d = dict(ref.config)  # carries bookkeeping keys such as _use_default_values
    cfg = VAEConfig.from_diffusers(d)
    assert cfg.block_out_channels == (32, 64, 64, 64) and cfg.layers_per_block == 2 and cfg.shift_factor is None
    again = TorchAutoencoderKL(**cfg.to_diffusers())
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert VAEConfig.from_diffusers(dict(again.config)) == cfg
    assert VAEConfig.from_diffusers({"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0"}) == VAEConfig()
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers({"latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]})
    with pytest.raises(ValueError, match="some_new_option"):
        VAEConfig.from_diffusers({"some_new_option": 1})
    sd = VAEConfig.stable_diffusion()
    assert sd.downsample_factor == 8 and sd.block_out_channels == (128, 256, 512, 512)
    sd_json = {  # the SD1.x vae/config.json
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert VAEConfig.from_diffusers(sd_json) == sd
    sdxl = VAEConfig.from_diffusers(dict(sd_json, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                                         latents_mean=None, latents_std=None, shift_factor=None))
    assert sdxl.scaling_factor == 0.13025 and sdxl.sample_size == 1024


def test_latent_helpers():
    cfg = VAEConfig(scaling_factor=0.5, shift_factor=0.1)
    z = jnp.linspace(-2, 2, 16).reshape(1, 2, 2, 4)
    np.testing.assert_allclose(scale_latents(z, cfg), (z - 0.1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, cfg), cfg), z, atol=1e-6)
    np.testing.assert_allclose(scale_latents(z, VAEConfig()), z * 0.18215, rtol=1e-6)
    mean = jnp.full((4096, 1, 1, 4), 0.5)
    logvar = jnp.full((4096, 1, 1, 4), np.log(4.0))
    s = np.asarray(sample_latent(mean, logvar, jax.random.key(0)))
    assert abs(s.mean() - 0.5) < 0.1 and abs(s.std() - 2.0) < 0.1
    np.testing.assert_allclose(kl_divergence(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4))), 0.0, atol=1e-7)


def test_vae_bfloat16_compute_runs_close():
    """dtype=bfloat16 computes in bf16 from the same float32 params (which stay float32)."""
    _, cfg, fm, params, (h, w) = _build("two_level")
    fb = Functional.abstract(lambda r: AutoencoderKL(cfg, dtype=jnp.bfloat16, rngs=r))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(fb.param_shapes()))
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, h, w, 3)).astype(np.float32)
    ref = np.asarray(jax.jit(lambda p, x: fm.bind(p)(x))(params, x))
    out = jax.jit(lambda p, x: fb.bind(p)(x))(params, x)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_loading_keeps_a_force_upcast_vae_in_float32(tiny_model_dir, tmp_path):
    """load_component(dtype=bfloat16) decodes in float32 when the VAE's config sets force_upcast (SD's
    VAE, diffusers' rule), and in bf16 when it does not; the UNet follows the dtype asked for."""
    import json
    import shutil

    from jedi_jax.loading import load_component

    def decoded_dtype(folder):
        vae = load_component(folder, "vae", dtype=jnp.bfloat16)
        z = jnp.zeros((1, 4, 4, vae.config.latent_channels))
        return jax.jit(lambda p, z: vae.functional.bind(p).decode(z))(vae.params, z).dtype

    assert json.loads((tiny_model_dir / "vae" / "config.json").read_text())["force_upcast"] is True
    assert decoded_dtype(tiny_model_dir) == jnp.float32
    folder = tmp_path / "no_upcast"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps(dict(cfg, force_upcast=False)))
    assert decoded_dtype(folder) == jnp.bfloat16


def test_vae_config_from_lists_is_hashable_and_equal_to_tuples():
    kw = dict(block_out_channels=[64, 128], down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2)
    listed, tupled = VAEConfig(**kw), VAEConfig(**{k: tuple(v) for k, v in kw.items()})
    assert listed == tupled and hash(listed) == hash(tupled)


def test_vae_attention_runs_on_the_shared_kernels():
    """The mid-block attention goes through models/attention.py: the "chunked" kernel (no (L, L)
    score matrix: 1 GiB per image at 1024 px in float32) gives the "xla" kernel's output, and an
    unknown kernel name fails when the model is built."""
    from jedi_jax.models import attention

    attention.register_kernel("chunked_5", attention.make_chunked_kernel(5))  # 5 divides no length here
    _, cfg, fm, params, (h, w) = _build("two_level")
    assert cfg.mid_block_add_attention
    chunked = Functional.abstract(lambda r: AutoencoderKL(cfg, attention_kernel="chunked_5", rngs=r))
    x = np.random.default_rng(1).uniform(-1, 1, size=(2, h, w, 3)).astype(np.float32)
    ref = np.asarray(jax.jit(lambda p, x: fm.bind(p)(x))(params, x))
    out = np.asarray(jax.jit(lambda p, x: chunked.bind(p)(x))(params, x))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        Functional.abstract(lambda r: AutoencoderKL(cfg, attention_kernel="nope", rngs=r))
