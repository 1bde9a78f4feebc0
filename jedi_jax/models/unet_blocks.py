"""UNet building blocks (NHWC), mirroring diffusers v0.42 module by module.

Parameter paths equal diffusers state-dict keys (docs/DESIGN.md). The set axis is folded into the
batch everywhere: tensors are (B*N, h, w, C). `num_members` and `member_mask` (B, N) travel down as
explicit arguments to the one place that uses them, JeDi's coupled self-attention (attn1 of
`BasicTransformerBlock`, Zeng et al., CVPR 2024, section 3).

Mirrored classes: diffusers.models.resnet.ResnetBlock2D, downsampling.Downsample2D,
upsampling.Upsample2D, transformers.transformer_2d.Transformer2DModel,
attention.BasicTransformerBlock, unets.unet_2d_blocks.{CrossAttnDownBlock2D, DownBlock2D,
UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D}.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jedi_jax.models import attention as attn_lib
from jedi_jax.models.layers import (Attention, FeedForward, conv, group_norm, layer_norm, linear,
                                    nearest_resize)

Dtype = Any


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` (pre-norm, time_embedding_norm="default", SiLU, optional 1x1 shortcut).
    temb_channels=None: no time embedding (the VAE's blocks)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], *, groups: int = 32,
                 eps: float = 1e-6, output_scale_factor: float = 1.0, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
                              if temb_channels is not None else None)
        self.norm2 = group_norm(out_channels, groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        """x (B*N, h, w, Cin), temb (B*N, Ct) or None -> (B*N, h, w, Cout)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B*N, h, w, Cout)
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(jax.nn.silu(temb))  # (B*N, Cout)
            h = h + t[:, None, None, :]  # (B*N, h, w, Cout)
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout p=0 omitted
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # (B*N, h, w, Cout)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """diffusers `Downsample2D(use_conv=True, name="op")`: 3x3 conv, stride 2 (`conv` key)."""

    def __init__(self, channels: int, *, padding: int = 1, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:  # diffusers pads (0, 1, 0, 1) before an unpadded conv
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)  # (B*N, ceil(h/2), ceil(w/2), C) with padding 1; floor(h/2) with 0 (the VAE)


class Upsample2D(nnx.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest 2x (or to `output_size`), then 3x3 conv."""

    def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, output_size: Optional[Sequence[int]] = None) -> jax.Array:
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else output_size
        return self.conv(nearest_resize(x, size))  # (B*N, H, W, C)


class BasicTransformerBlock(nnx.Module):
    """diffusers `BasicTransformerBlock` (norm_type="layer_norm", GEGLU feed-forward).

    attn1 is JeDi's coupled self-attention across the set (paper section 3); attn2 is per-image
    cross-attention to that image's own caption.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *,
                 kernel: attn_lib.Kernel = "xla", norm_eps: float = 1e-5, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, norm_eps, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, heads, dim_head, kernel=kernel, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, norm_eps, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, kernel=kernel,
                               dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(dim, norm_eps, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, *, num_members: int,
                 member_mask: Optional[jax.Array] = None) -> jax.Array:
        """x (B*N, L, C), context (B*N, T, Dc), member_mask (B, N) -> (B*N, L, C)."""
        x = x + self.attn1(self.norm1(x), num_members=num_members, member_mask=member_mask)
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class Transformer2DModel(nnx.Module):
    """diffusers `Transformer2DModel` for continuous input: GroupNorm(eps 1e-6) -> proj_in (1x1 conv for
    SD 1.x, Linear with `use_linear_projection`) -> BasicTransformerBlocks -> proj_out -> + residual.

    `remat=True` rematerialises each transformer block (nnx.remat = jax.checkpoint) in the backward pass.
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, *, num_layers: int = 1,
                 cross_attention_dim: int, norm_num_groups: int = 32, use_linear_projection: bool = False,
                 kernel: attn_lib.Kernel = "xla", remat: bool = False, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.remat = remat
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
        if use_linear_projection:
            self.proj_in = linear(in_channels, inner, dtype=dtype, rngs=rngs)
            self.proj_out = linear(inner, in_channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = conv(in_channels, inner, 1, dtype=dtype, rngs=rngs)
            self.proj_out = conv(inner, in_channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, kernel=kernel, dtype=dtype,
                                  rngs=rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x: jax.Array, context: jax.Array, *, num_members: int,
                 member_mask: Optional[jax.Array] = None) -> jax.Array:
        """x (B*N, h, w, C), context (B*N, T, Dc) -> (B*N, h, w, C)."""
        M, h, w, C = x.shape
        residual = x
        x = self.norm(x)
        # proj_in commutes with the token flattening (1x1 conv == per-pixel linear)
        x = self.proj_in(x)  # (B*N, h, w, inner)
        x = x.reshape(M, h * w, x.shape[-1])  # (B*N, h, w, inner) -> (B*N, h*w, inner)

        def run_block(block, x, context, member_mask):
            return block(x, context, num_members=num_members, member_mask=member_mask)

        run = nnx.remat(run_block) if self.remat else run_block
        for block in self.transformer_blocks:
            x = run(block, x, context, member_mask)  # (B*N, h*w, inner)
        x = x.reshape(M, h, w, x.shape[-1])  # (B*N, h*w, inner) -> (B*N, h, w, inner)
        x = self.proj_out(x)  # (B*N, h, w, C)
        return x + residual


def _transformer(out_ch: int, heads: int, depth: int, cross_dim: int, groups: int, linear_proj: bool,
                 kernel, remat: bool, dtype, rngs) -> Transformer2DModel:
    return Transformer2DModel(heads, out_ch // heads, out_ch, num_layers=depth, cross_attention_dim=cross_dim,
                              norm_num_groups=groups, use_linear_projection=linear_proj, kernel=kernel,
                              remat=remat, dtype=dtype, rngs=rngs)


class DownBlock2D(nnx.Module):
    """diffusers `DownBlock2D`: resnets, then an optional stride-2 conv downsampler."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 add_downsample: bool, groups: int = 32, eps: float = 1e-5, downsample_padding: int = 1,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups=groups,
                          eps=eps, dtype=dtype, rngs=rngs)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding, dtype=dtype,
                                                    rngs=rngs)]) if add_downsample else None)

    def __call__(self, x, temb, context=None, *, num_members: int = 1, member_mask=None):
        """x (B*N, h, w, Cin) -> (x, skips): every resnet output (and the downsampled x) is a skip."""
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)  # (B*N, h, w, Cout)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B*N, h/2, w/2, Cout)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """diffusers `CrossAttnDownBlock2D`: (resnet, Transformer2DModel) pairs, then an optional downsampler."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 add_downsample: bool, heads: int, cross_attention_dim: int, transformer_layers: int = 1,
                 use_linear_projection: bool = False, groups: int = 32, eps: float = 1e-5,
                 downsample_padding: int = 1, kernel: attn_lib.Kernel = "xla", remat: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(in_channels, out_channels, temb_channels, num_layers=num_layers,
                         add_downsample=add_downsample, groups=groups, eps=eps,
                         downsample_padding=downsample_padding, dtype=dtype, rngs=rngs)
        self.attentions = nnx.List([
            _transformer(out_channels, heads, transformer_layers, cross_attention_dim, groups,
                         use_linear_projection, kernel, remat, dtype, rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x, temb, context=None, *, num_members: int = 1, member_mask=None):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(x, temb)  # (B*N, h, w, Cout)
            x = attn(x, context, num_members=num_members, member_mask=member_mask)  # (B*N, h, w, Cout)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B*N, h/2, w/2, Cout)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """diffusers `UNetMidBlock2DCrossAttn`: resnet, then (Transformer2DModel, resnet) pairs."""

    def __init__(self, channels: int, temb_channels: int, *, heads: int, cross_attention_dim: int,
                 transformer_layers: int = 1, num_layers: int = 1, use_linear_projection: bool = False,
                 groups: int = 32, eps: float = 1e-5, output_scale_factor: float = 1.0,
                 kernel: attn_lib.Kernel = "xla", remat: bool = False, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps,
                          output_scale_factor=output_scale_factor, dtype=dtype, rngs=rngs)
            for _ in range(num_layers + 1)
        ])
        self.attentions = nnx.List([
            _transformer(channels, heads, transformer_layers, cross_attention_dim, groups,
                         use_linear_projection, kernel, remat, dtype, rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x, temb, context, *, num_members: int = 1, member_mask=None):
        """x (B*N, h, w, C) -> (B*N, h, w, C)."""
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = attn(x, context, num_members=num_members, member_mask=member_mask)
            x = resnet(x, temb)
        return x


class UpBlock2D(nnx.Module):
    """diffusers `UpBlock2D`: resnets on concat(x, skip) (skips consumed last-first), optional upsampler."""

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, add_upsample: bool, groups: int = 32, eps: float = 1e-5,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        resnets = []
        for i in range(num_layers):
            skip_ch = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_channels, temb_channels, groups=groups, eps=eps,
                                         dtype=dtype, rngs=rngs))
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def _upsample(self, x, upsample_size):
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)  # (B*N, H, W, Cout)
        return x

    def __call__(self, x, skips, temb, context=None, *, upsample_size=None, num_members: int = 1,
                 member_mask=None):
        """x (B*N, h, w, Cprev); skips: list of (B*N, h, w, Cs), consumed from the end."""
        skips = list(skips)
        for resnet in self.resnets:
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # (B*N, h, w, Cprev + Cs)
            x = resnet(x, temb)  # (B*N, h, w, Cout)
        return self._upsample(x, upsample_size)


class CrossAttnUpBlock2D(UpBlock2D):
    """diffusers `CrossAttnUpBlock2D`: (resnet on concat(x, skip), Transformer2DModel) pairs, upsampler."""

    has_cross_attention = True

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, add_upsample: bool, heads: int, cross_attention_dim: int,
                 transformer_layers: int = 1, use_linear_projection: bool = False, groups: int = 32,
                 eps: float = 1e-5, kernel: attn_lib.Kernel = "xla", remat: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(in_channels, prev_output_channels, out_channels, temb_channels, num_layers=num_layers,
                         add_upsample=add_upsample, groups=groups, eps=eps, dtype=dtype, rngs=rngs)
        self.attentions = nnx.List([
            _transformer(out_channels, heads, transformer_layers, cross_attention_dim, groups,
                         use_linear_projection, kernel, remat, dtype, rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x, skips, temb, context=None, *, upsample_size=None, num_members: int = 1,
                 member_mask=None):
        skips = list(skips)
        for resnet, attn in zip(self.resnets, self.attentions):
            x = jnp.concatenate([x, skips.pop()], axis=-1)  # (B*N, h, w, Cprev + Cs)
            x = resnet(x, temb)  # (B*N, h, w, Cout)
            x = attn(x, context, num_members=num_members, member_mask=member_mask)  # (B*N, h, w, Cout)
        return self._upsample(x, upsample_size)
