"""Vision Transformers in Flax NNX: CLIP's image tower and the DINO ViT (DreamBench's image embedders).

Mirrors transformers 5.x:
  - `models/clip/modeling_clip.py`: `CLIPVisionModelWithProjection` as `CLIPModel` holds it
    (`CLIPVisionEmbeddings`: bias-free patch conv, `class_embedding`, `position_embedding`; then
    `pre_layrnorm`, the pre-LN `CLIPEncoderLayer`s of `clip_text`, `post_layernorm` on the CLS token,
    bias-free `visual_projection`).
  - `models/vit/modeling_vit.py`: `ViTModel(add_pooling_layer=False)`, e.g. facebook/dino-vits16
    (`ViTEmbeddings`: patch conv with bias, `cls_token`, `position_embeddings`; pre-LN `ViTLayer`s with
    exact gelu; a final `layernorm` over all tokens).

Parameter paths equal the state-dict keys of the checkpoint files (docs/DESIGN.md). Both transformers 4
and 5's `save_pretrained` write ViT in its v4 naming (`encoder.layer.3.attention.attention.query`,
`...attention.output.dense`, `...intermediate.dense`, `...output.dense`), so do we; transformers 5
renames these in memory only. Three parameters are bare `nn.Parameter`s in torch, not in a Linear /
Embedding / LayerNorm, and keep their torch shapes here: `class_embedding` (D,), `cls_token`
(1, 1, D), `position_embeddings` (1, N+1, D) (see `RAW_PARAMETERS`).

Images are NHWC float32, already normalized (eval.image_text_embedders does the preprocessing), at
exactly the config's image_size: position-embedding interpolation is not implemented.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jedi_jax.models.clip_text import ACTIVATIONS, CLIPEncoder, activation, multi_head_attention
from jedi_jax.models.layers import layer_norm, linear

# Leaf names of bare torch nn.Parameters: their state-dict key is the parameter path as it is.
RAW_PARAMETERS = ("class_embedding", "cls_token", "position_embeddings")
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
           "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "qkv_bias", "projection_dim")
# transformers' defaults: CLIPVisionConfig (with CLIPConfig's projection_dim) and ViTConfig.
CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     qkv_bias=True, projection_dim=512)
VIT_DEFAULTS = dict(CLIP_DEFAULTS, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12, projection_dim=None)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The fields of transformers `CLIPVisionConfig` / `ViTConfig` we model. openai/clip-vit-large-patch14:
    hidden 1024, 24 layers, 16 heads, patch 14, quick_gelu, projection 768. facebook/dino-vits16: hidden 384,
    12 layers, 6 heads, patch 16, gelu, eps 1e-12, no projection."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float
    qkv_bias: bool = True  # ViT only (CLIP's q/k/v always have biases)
    projection_dim: int | None = None  # CLIP only: visual_projection's output size

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision config: unsupported hidden_act={self.hidden_act!r} (supported: {ACTIVATIONS})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision config: hidden_size must be a multiple of num_attention_heads")
        ints = isinstance(self.image_size, int) and isinstance(self.patch_size, int)
        if not ints or self.image_size % self.patch_size:
            raise ValueError(f"vision config: image_size {self.image_size!r} must be one int, a multiple of "
                             f"patch_size {self.patch_size!r}")

    @classmethod
    def from_transformers(cls, d: dict, defaults: dict) -> "ViTConfig":
        """From a config.json dict (CLIPVisionConfig or ViTConfig), transformers' `defaults` for what it omits.
        A square image_size or patch_size given as [n, n] is read as n."""
        kwargs = dict(defaults, **{k: d[k] for k in _FIELDS if d.get(k) is not None})
        for k in ("image_size", "patch_size"):
            if isinstance(kwargs[k], (list, tuple)) and len(set(kwargs[k])) == 1:
                kwargs[k] = kwargs[k][0]
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:  # patches + the class token
        return (self.image_size // self.patch_size) ** 2 + 1


def _patch_conv(cfg: ViTConfig, use_bias: bool, dtype, rngs) -> nnx.Conv:
    """torch Conv2d(C, D, patch, stride=patch) on NHWC; kernel (p, p, C, D)."""
    p = cfg.patch_size
    return nnx.Conv(cfg.num_channels, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _patches(conv: nnx.Conv, cfg: ViTConfig, pixels: jax.Array) -> jax.Array:
    """pixels (B, H, W, C) at the config's image size -> patch embeddings (B, N, D), row-major as torch's flatten(2)."""
    if pixels.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"images are {pixels.shape[1]}x{pixels.shape[2]} but the model takes {cfg.image_size}x"
                         f"{cfg.image_size} (position-embedding interpolation is not implemented)")
    x = conv(pixels)  # (B, h, w, D)
    return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, D)


def _raw(shape, rngs) -> nnx.Param:
    """A bare torch nn.Parameter (RAW_PARAMETERS), float32, N(0, 0.02) until loaded."""
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02)


# --------------------------------------------------------------------------------------------- CLIP
class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.class_embedding = _raw((cfg.hidden_size,), rngs)  # (D,)
        self.patch_embedding = _patch_conv(cfg, False, dtype, rngs)
        self.position_embedding = nnx.Embed(cfg.num_positions, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                            rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, N+1, D)
        x = _patches(self.patch_embedding, self.cfg, pixels)  # (B, N, D)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))  # (B, 1, D)
        return jnp.concatenate([cls, x], axis=1) + self.position_embedding.embedding[...][None].astype(x.dtype)


class CLIPVisionTransformer(nnx.Module):
    """transformers' `CLIPVisionModel` (`vision_model` in `CLIPModel`): embeddings, pre_layrnorm, encoder,
    post_layernorm of the CLS token. The encoder layers are `clip_text`'s (the same `CLIPEncoderLayer`),
    run with a full (non-causal) attention mask."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels (B, H, W, C) -> (last_hidden_state (B, N+1, D) without a final norm, pooled (B, D))."""
        h = self.pre_layrnorm(self.embeddings(pixels))  # (B, T, D)
        everywhere = jnp.ones((1, 1, h.shape[1], h.shape[1]), bool)  # (1, 1, T, T): every token sees every token
        for layer in self.encoder.layers:
            h = layer(h, everywhere)
        return h, self.post_layernorm(h[:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers `CLIPVisionModelWithProjection`, and CLIPModel's `get_image_features`:
    pixels (B, H, W, C) -> image_embeds (B, P) = visual_projection(pooled CLS), not normalized."""

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.projection_dim is None:
            raise ValueError("CLIPVisionModelWithProjection needs a config with projection_dim")
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, rngs=rngs)
        self.visual_projection = linear(config.hidden_size, config.projection_dim, dtype=dtype, rngs=rngs,
                                        use_bias=False)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)[1])  # (B, P)


# ---------------------------------------------------------------------------------------------- ViT
class ViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.projection = _patch_conv(cfg, True, dtype, rngs)


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.cls_token = _raw((1, 1, cfg.hidden_size), rngs)  # (1, 1, D)
        self.patch_embeddings = ViTPatchEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.position_embeddings = _raw((1, cfg.num_positions, cfg.hidden_size), rngs)  # (1, N+1, D)

    def __call__(self, pixels: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, N+1, D)
        x = _patches(self.patch_embeddings.projection, self.cfg, pixels)  # (B, N, D)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))  # (B, 1, D)
        return jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)


class ViTDense(nnx.Module):
    """A module holding one Linear named `dense` (transformers v4's ViTSelfOutput / ViTIntermediate / ViTOutput)."""

    def __init__(self, din: int, dout: int, *, dtype, rngs: nnx.Rngs):
        self.dense = linear(din, dout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class ViTSelfAttention(nnx.Module):
    """Multi-head self-attention, scale head_dim**-0.5, float32 softmax, no mask (transformers' eager ViT attention)."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = linear(d, d, dtype=dtype, rngs=rngs, use_bias=cfg.qkv_bias)
        self.key = linear(d, d, dtype=dtype, rngs=rngs, use_bias=cfg.qkv_bias)
        self.value = linear(d, d, dtype=dtype, rngs=rngs, use_bias=cfg.qkv_bias)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, D) -> (B, T, D), before the output projection
        return multi_head_attention(self.query(x), self.key(x), self.value(x), self.num_heads)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = ViTSelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = ViTDense(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.attention(x))


class ViTLayer(nnx.Module):
    """Pre-LN block: x + attention(layernorm_before(x)), then + output(gelu(intermediate(layernorm_after(x))))."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        self.attention = ViTAttention(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = ViTDense(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.output = ViTDense(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layernorm_before = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.layernorm_after = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, T, D) -> (B, T, D)
        x = x + self.attention(self.layernorm_before(x))
        h = activation(self.hidden_act, self.intermediate(self.layernorm_after(x)))  # (B, T, I)
        return x + self.output(h)


class ViTEncoder(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([ViTLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class ViTModel(nnx.Module):
    """transformers `ViTModel(add_pooling_layer=False)` (DINO): pixels (B, H, W, C) -> last_hidden_state
    (B, N+1, D) after the final `layernorm`; DreamBench's DINO embedding is its CLS token, `[:, 0]`."""

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ViTEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = ViTEncoder(config, dtype=dtype, rngs=rngs)
        self.layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        h = self.embeddings(pixels)  # (B, T, D)
        for layer in self.encoder.layer:
            h = layer(h)
        return self.layernorm(h)  # (B, T, D)


__all__ = ["RAW_PARAMETERS", "CLIP_DEFAULTS", "VIT_DEFAULTS", "ViTConfig", "CLIPVisionModelWithProjection", "ViTModel"]
