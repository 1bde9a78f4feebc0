"""Small shared building blocks of the Stable Diffusion UNet, NHWC, parameter paths = diffusers keys.

Mirrors diffusers (v0.42): `embeddings.get_timestep_embedding` / `Timesteps` / `TimestepEmbedding`,
`activations.GEGLU`, `attention.FeedForward`, `attention_processor.Attention` (with
`AttnProcessor2_0`), `upsampling.Upsample2D`'s nearest interpolation. Parameters are float32; `dtype`
is the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jedi_jax.models import attention as attn_lib

Dtype = Any


# ----------------------------------------------------------------------------- nnx factories
def linear(din: int, dout: int, *, dtype: Dtype, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    """torch.nn.Linear equivalent; kernel (din, dout) = torch weight transposed."""
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def conv(cin: int, cout: int, kernel_size: int, *, dtype: Dtype, rngs: nnx.Rngs, stride: int = 1,
         padding: Optional[int] = None) -> nnx.Conv:
    """torch.nn.Conv2d(cin, cout, k, stride, padding) in NHWC; kernel (k, k, cin, cout)."""
    p = (kernel_size - 1) // 2 if padding is None else padding
    return nnx.Conv(cin, cout, (kernel_size, kernel_size), strides=(stride, stride),
                    padding=((p, p), (p, p)), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def group_norm(channels: int, groups: int, eps: float, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """torch.nn.GroupNorm (affine); statistics in float32 with the two-pass variance torch uses."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                         dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def layer_norm(dim: int, eps: float, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch.nn.LayerNorm (elementwise affine)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class KeySequence:
    """Stands in for `nnx.Rngs` while building a large model: `params()` is fold_in(key, i), i a Python counter.

    Why: under `nnx.eval_shape` every `nnx.Rngs` draw updates a traced counter Variable; flax 0.12.8
    then reads the tracer's `.sharding`, and jax 0.10 answers with an error message whose origin
    search walks the whole trace so far. That is quadratic in the number of parameters (abstract
    SDXL init: ~140 s). A Python counter costs nothing. Deterministic given the incoming rngs.
    """

    def __init__(self, rngs: nnx.Rngs):
        self._key = rngs.params()
        self._count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key

    __call__ = params


class Placeholder(nnx.Module):
    """Stands in for a parameter-free torch module (Dropout) so nnx.List indices match torch's."""

    def __call__(self, x):
        return x


# ---------------------------------------------------------------------------- time embedding
def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       scale: float = 1.0, max_period: int = 10000) -> jax.Array:
    """Sinusoidal embedding (diffusers `get_timestep_embedding`). timesteps (M,) -> (M, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)  # (half,)
    exponent = exponent / (half - freq_shift)
    freqs = jnp.exp(exponent)  # (half,)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]  # (M, half)
    args = scale * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # (M, 2*half)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)  # cos first
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))  # (M, dim)
    return emb


class Timesteps(nnx.Module):
    """diffusers `embeddings.Timesteps` (parameter-free)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  freq_shift=self.freq_shift)


class TimestepEmbedding(nnx.Module):
    """diffusers `embeddings.TimestepEmbedding`: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))  # (M, time_embed_dim)


# ------------------------------------------------------------------------------ feed-forward
class GEGLU(nnx.Module):
    """diffusers `activations.GEGLU`: proj to 2*inner, split (value, gate), value * gelu(gate) (erf)."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.proj = linear(dim_in, 2 * dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)  # (M, L, inner) each
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers `attention.FeedForward` with activation "geglu": net = [GEGLU, Dropout, Linear]."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype, rngs: nnx.Rngs):
        inner = int(dim * mult)
        self.net = nnx.List([
            GEGLU(dim, inner, dtype=dtype, rngs=rngs),
            Placeholder(),  # ff.net.1 = Dropout in torch
            linear(inner, dim, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------- attention
class Attention(nnx.Module):
    """diffusers `attention_processor.Attention` as used by `BasicTransformerBlock` (bias-free q/k/v,
    to_out.0 Linear with bias, to_out.1 Dropout omitted: index 0 is the only parameterised entry).

    Self-attention (`context is None`) is JeDi's coupled self-attention over the set
    (`attention.coupled_self_attention`, paper section 3); cross-attention is per image.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: Optional[int] = None,
                 kernel: attn_lib.Kernel = "xla", dtype: Dtype, rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.heads = heads
        self.dim_head = dim_head
        self.kernel = kernel
        self.to_q = linear(query_dim, inner, dtype=dtype, rngs=rngs, use_bias=False)
        self.to_k = linear(kv_dim, inner, dtype=dtype, rngs=rngs, use_bias=False)
        self.to_v = linear(kv_dim, inner, dtype=dtype, rngs=rngs, use_bias=False)
        self.to_out = nnx.List([linear(inner, query_dim, dtype=dtype, rngs=rngs)])

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head)  # (M, L, H*D) -> (M, L, H, D)

    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *, num_members: int = 1,
                 member_mask: Optional[jax.Array] = None) -> jax.Array:
        """x (B*N, L, C); context (B*N, T, Dc) for cross-attention or None for coupled self-attention."""
        q = self._heads(self.to_q(x))  # (B*N, L, H, D)
        if context is None:
            k = self._heads(self.to_k(x))  # (B*N, L, H, D)
            v = self._heads(self.to_v(x))  # (B*N, L, H, D)
            out = attn_lib.coupled_self_attention(q, k, v, num_members=num_members, member_mask=member_mask,
                                                  kernel=self.kernel)  # (B*N, L, H, D)
        else:
            k = self._heads(self.to_k(context))  # (B*N, T, H, D)
            v = self._heads(self.to_v(context))  # (B*N, T, H, D)
            out = attn_lib.dot_product_attention(q, k, v, kernel=self.kernel)  # (B*N, L, H, D)
        out = out.reshape(out.shape[0], out.shape[1], self.heads * self.dim_head)  # (B*N, L, H*D)
        return self.to_out[0](out)  # (B*N, L, C)


# ---------------------------------------------------------------------------------- resizing
def nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """torch F.interpolate(mode="nearest") on NHWC: src = floor(dst * in / out). x (M, h, w, C)."""
    _, h, w, _ = x.shape
    oh, ow = int(size[0]), int(size[1])
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (M, 2h, 2w, C)
    ih = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)  # (oh,)
    iw = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)  # (ow,)
    return x[:, ih][:, :, iw]  # (M, oh, ow, C)
