"""The Stable Diffusion VAE (KL autoencoder) in Flax NNX, NHWC.

Mirrors diffusers 0.42 `diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL` with its
`vae.Encoder` / `vae.Decoder`, `unet_2d_blocks.DownEncoderBlock2D` / `UpDecoderBlock2D` /
`UNetMidBlock2D`, `resnet.ResnetBlock2D` (no time embedding), `downsampling.Downsample2D`
(padding 0, name "op"), `upsampling.Upsample2D` and the mid-block `attention_processor.Attention`
(`_from_deprecated_attn_block=True`, run by `AttnProcessor2_0`). The ResNet, down- and upsampling
blocks are the UNet's (`unet_blocks.py`; ResnetBlock2D with temb_channels=None).

Parameter paths equal the diffusers state-dict keys (docs/DESIGN.md), e.g.
`encoder.down_blocks.0.resnets.0.conv1.kernel`, `encoder.down_blocks.0.downsamplers.0.conv.kernel`,
`decoder.up_blocks.0.upsamplers.0.conv.kernel`, `encoder.mid_block.attentions.0.to_out.0.kernel`.
The mid-block attention uses diffusers' CURRENT names (group_norm, to_q, to_k, to_v, to_out.0);
legacy checkpoints (query/key/value/proj_attn) are renamed by the converter.

The set axis: the VAE sees single images. Callers fold `(B, N, H, W, 3)` into `(B*N, H, W, 3)`.

Latent scaling (diffusers pipelines, not part of the module): the diffusion model sees
`scale_latents(z) = (z - shift_factor) * scaling_factor` (shift 0 when None; SD1/2: 0.18215,
SDXL: 0.13025) and the decoder gets `unscale_latents(z) = z / scaling_factor + shift_factor`.

`force_upcast` is metadata for pipelines (diffusers runs such a VAE in float32 even when the
rest is half precision): `jedi_jax.loading.load_component` does the same; a caller building the
module itself passes `dtype=jnp.float32` when it is set.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jedi_jax.models import attention as attn_lib
from jedi_jax.models.layers import conv, group_norm, linear
from jedi_jax.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D

_DIFFUSERS_DEFAULTS: dict[str, Any] = {  # AutoencoderKL.__init__ defaults
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Keys whose only supported value is the default (anything else raises in from_diffusers).
_FIXED = {"act_fn": ("silu", "swish"), "latents_mean": (None,), "latents_std": (None,)}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of diffusers' `AutoencoderKL` (defaults = its `__init__` defaults).

    `VAEConfig.stable_diffusion()` is the SD1.x/2.x/XL architecture (SDXL: scaling_factor 0.13025).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # lists (as JSON gives them) become tuples: the config stays hashable and equal to its parsed twin
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have equal lengths")
        for key, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if any(t != want for t in types):
                raise ValueError(f"{key}: only {want!r} is supported, got {types}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups")

    @classmethod
    def stable_diffusion(cls, **overrides) -> "VAEConfig":
        base = dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        )
        return cls(**{**base, **overrides})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        """From a diffusers `vae/config.json` dict. Keys starting with '_' are bookkeeping (ignored);
        an unknown key or an unsupported value raises ValueError naming the key."""
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key not in _DIFFUSERS_DEFAULTS:
                raise ValueError(f"VAE config: unsupported key {key!r} (value {value!r})")
            if key in _FIXED:
                if value not in _FIXED[key]:
                    raise ValueError(f"VAE config: unsupported {key}={value!r} (supported: {_FIXED[key]})")
                continue
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """A dict that `diffusers.AutoencoderKL(**d)` accepts (lists for tuples, JSON-ready)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["act_fn"] = "silu"
        return d


# ----------------------------------------------------------------------------- building blocks


class VAEAttention(nnx.Module):
    """diffusers `Attention` as built by `UNetMidBlock2D` for the VAE: GroupNorm, single head of
    dim C (`attention_head_dim = C`), float32 softmax, residual connection, rescale 1. Runs on the
    shared attention kernels: "chunked" never holds the (L, L) scores, 1 GiB per image in float32
    at 1024 px (cuDNN's head-dim limit rules out "cudnn" for C = 512)."""

    def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs, attention_kernel: str = "xla"):
        attn_lib.get_kernel(attention_kernel)  # an unknown name fails here, at construction
        self.attention_kernel = attention_kernel
        self.group_norm = group_norm(channels, groups, 1e-6, dtype=dtype, rngs=rngs)
        lin = lambda: linear(channels, channels, dtype=dtype, rngs=rngs)  # noqa: E731
        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.to_out = nnx.List([lin()])  # torch to_out = [Linear, Dropout]; Dropout has no params

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, H, W, C)
        b, hgt, wid, c = x.shape
        h = self.group_norm(x).reshape(b, hgt * wid, 1, c)  # (B, L, 1 head, C)
        h = attn_lib.dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h),
                                           kernel=self.attention_kernel)  # (B, L, 1, C), float32 softmax
        h = self.to_out[0](h).reshape(b, hgt, wid, c)
        return x + h


class UNetMidBlock2D(nnx.Module):
    """diffusers `UNetMidBlock2D` (num_layers=1): resnet, [attention], resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, rngs: nnx.Rngs,
                 attention_kernel: str = "xla"):
        self.add_attention = add_attention
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, groups=groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(channels, groups, dtype=dtype, rngs=rngs,
                                                 attention_kernel=attention_kernel)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_downsample: bool, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups=groups, dtype=dtype, rngs=rngs)
                                 for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, add_upsample: bool, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups=groups, dtype=dtype, rngs=rngs)
                                 for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """diffusers `vae.Encoder` (double_z=True): (B, H, W, in) -> (B, H/f, W/f, 2*latent); sizes that f
    does not divide are floored at every level, as in diffusers."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs, attention_kernel: str = "xla"):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        blocks, cout = [], ch[0]
        for i, c in enumerate(ch):
            cin, cout = cout, c
            blocks.append(DownEncoderBlock2D(cin, cout, cfg.layers_per_block, g, i < len(ch) - 1, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs,
                                        attention_kernel=attention_kernel)
        self.conv_norm_out = group_norm(ch[-1], g, 1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers `vae.Decoder` (norm_type "group"): (B, h, w, latent) -> (B, h*f, w*f, out)."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs, attention_kernel: str = "xla"):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, ch[-1], 3, dtype=dtype, rngs=rngs)
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs,
                                        attention_kernel=attention_kernel)
        rev, blocks, cout = list(reversed(ch)), [], ch[-1]
        for i, c in enumerate(rev):
            cin, cout = cout, c
            blocks.append(UpDecoderBlock2D(cin, cout, cfg.layers_per_block + 1, g, i < len(ch) - 1, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(ch[0], g, 1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------- the autoencoder


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL` (no tiling/slicing). Images (B, H, W, 3) in [-1, 1], latents
    (B, H/f, W/f, latent_channels) UNSCALED (apply `scale_latents` before the diffusion model)."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, attention_kernel: str = "xla"):
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs, attention_kernel=attention_kernel)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs, attention_kernel=attention_kernel)
        lc = config.latent_channels
        self.quant_conv = conv(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = conv(lc, lc, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, H, W, in) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent); logvar in [-30, 20]
        (diffusers `DiagonalGaussianDistribution`)."""
        h = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)  # torch.chunk(.., 2, dim=1): first half is the mean
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, latent) unscaled -> x (B, h*f, w*f, out), nominally in [-1, 1] (not clipped)."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mode: decode(encode(x).mean)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


# ----------------------------------------------------------------------------- pure helpers


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A posterior sample `mean + exp(logvar / 2) * eps` (diffusers `DiagonalGaussianDistribution.sample`)."""
    eps = jax.random.normal(key, mean.shape, dtype=mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def scale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> diffusion-model latents: `(z - shift_factor) * scaling_factor`."""
    shift = config.shift_factor or 0.0
    return (z - shift) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Diffusion-model latents -> VAE latents (inverse of `scale_latents`), before `decode`."""
    shift = config.shift_factor or 0.0
    return z / config.scaling_factor + shift


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(posterior || N(0, I)) summed over (H, W, C) -> (B,) (diffusers `DiagonalGaussianDistribution.kl`)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
