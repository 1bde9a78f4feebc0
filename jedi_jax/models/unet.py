"""JeDi UNet: the Stable Diffusion UNet (diffusers `UNet2DConditionModel`) over image *sets*.

Inputs carry a set axis: latents (B, N, h, w, C). Every layer folds it into the batch,
(B*N, h, w, C), except JeDi's coupled self-attention (Zeng et al., CVPR 2024, section 3), where the
tokens of all N members of a set attend to each other (`attention.coupled_self_attention`).
With N == 1 this is exactly plain Stable Diffusion, so converted SD 1.x / 2.x / SDXL weights load
unchanged (parameter paths = diffusers state-dict keys, docs/DESIGN.md).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jedi_jax.models import attention as attn_lib
from jedi_jax.models.layers import KeySequence, Timesteps, TimestepEmbedding, conv, group_norm
from jedi_jax.models.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                         UNetMidBlock2DCrossAttn, UpBlock2D)

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers UNet2DConditionModel options we do not implement: only these values are accepted.
_MUST_BE = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dropout": (0.0,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),
}
_IGNORED = ("sample_size",)  # bookkeeping; sample_size is kept only to be written back


def _levels(value, n: int, key: str) -> tuple:
    """int -> (int,)*n; list -> tuple of length n (ValueError naming `key` otherwise)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"unsupported {key}={value!r}: need one int per level ({n} levels)")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def _compact(values: tuple):
    return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel hyper-parameters (per-level values as tuples, in down-block order).

    `num_heads` is diffusers' `attention_head_dim` (a misnomer there: it is the number of heads;
    the per-head dim is channels // heads). SD 1.x: 8 heads everywhere; SD 2.x / SDXL: per level.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    use_linear_projection: bool = False
    upcast_attention: bool = False  # accepted; our kernels always softmax in float32
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: Optional[str] = None  # None or "text_time" (SDXL)
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    sample_size: Optional[int] = None  # bookkeeping only

    def __post_init__(self):
        # Normalize what a caller may pass as diffusers does (an int for every level, lists for tuples):
        # the config stays hashable (a static jit argument) and equal to its from_diffusers twin.
        set_ = functools.partial(object.__setattr__, self)
        set_("block_out_channels", tuple(int(c) for c in self.block_out_channels))
        n = len(self.block_out_channels)
        for key in ("layers_per_block", "transformer_layers_per_block", "num_heads", "cross_attention_dim"):
            set_(key, _levels(getattr(self, key), n, key))
        for key in ("down_block_types", "up_block_types"):
            value = getattr(self, key)
            set_(key, (value,) if isinstance(value, str) else tuple(value))
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key} must have {n} entries (one per level), got {getattr(self, key)}")
        if bad := [t for t in self.down_block_types if t not in _DOWN_TYPES]:
            raise ValueError(f"unsupported down_block_types {bad}; supported: {_DOWN_TYPES}")
        if bad := [t for t in self.up_block_types if t not in _UP_TYPES]:
            raise ValueError(f"unsupported up_block_types {bad}; supported: {_UP_TYPES}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"unsupported act_fn={self.act_fn!r}; supported: silu")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unsupported addition_embed_type={self.addition_embed_type!r}")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        for c, h in zip(self.block_out_channels, self.num_heads):
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"channels {c} must be divisible by heads {h} and norm_num_groups")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Reads a diffusers `unet/config.json` dict; ValueError naming any unsupported option."""
        d = dict(d)
        if "norm_num_groups" in d and d["norm_num_groups"] is None:
            raise ValueError("unsupported UNet option norm_num_groups=None (GroupNorm is required)")
        for key, allowed in _MUST_BE.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"unsupported UNet option {key}={d[key]!r} (jedi_jax supports {allowed})")
        known = set(_MUST_BE) | set(_IGNORED) | {f.name for f in dataclasses.fields(cls)} | {"attention_head_dim"}
        known -= {"num_heads"}
        if unknown := sorted(k for k in d if not k.startswith("_") and k not in known):
            raise ValueError(f"unknown UNet config keys {unknown}")
        down = tuple(d.get("down_block_types", cls.down_block_types))
        n = len(down)
        cad = d.get("cross_attention_dim", 1280)
        heads = d.get("attention_head_dim", 8)  # diffusers: num_attention_heads defaults to attention_head_dim
        return cls(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels)),
            down_block_types=down,
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            layers_per_block=_levels(d.get("layers_per_block", 2), n, "layers_per_block"),
            transformer_layers_per_block=_levels(d.get("transformer_layers_per_block", 1), n,
                                                 "transformer_layers_per_block"),
            num_heads=_levels(heads, n, "attention_head_dim"),
            cross_attention_dim=_levels(cad, n, "cross_attention_dim"),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            upcast_attention=bool(d.get("upcast_attention") or False),  # SDXL writes null
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            act_fn=d.get("act_fn", "silu"),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=d.get("freq_shift", 0),
            downsample_padding=int(d.get("downsample_padding", 1)),
            mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
            time_embedding_dim=d.get("time_embedding_dim"),
            conv_in_kernel=int(d.get("conv_in_kernel", 3)),
            conv_out_kernel=int(d.get("conv_out_kernel", 3)),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=d.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
            sample_size=d.get("sample_size"),
        )

    def to_diffusers(self) -> dict:
        """A dict `diffusers.UNet2DConditionModel(**d)` accepts and that `from_diffusers` reads back."""
        d = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": list(self.up_block_types),
            "layers_per_block": _compact(self.layers_per_block),
            "transformer_layers_per_block": _compact(self.transformer_layers_per_block),
            "attention_head_dim": _compact(self.num_heads),
            "cross_attention_dim": _compact(self.cross_attention_dim),
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "act_fn": self.act_fn,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "time_embedding_dim": self.time_embedding_dim,
            "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        }
        if self.sample_size is not None:
            d["sample_size"] = self.sample_size
        return d


class UNet(nnx.Module):
    """diffusers `UNet2DConditionModel` (SD 1.x / 2.x / SDXL layouts) with JeDi coupled self-attention.

    Parameters are float32; `dtype` is the compute dtype. `attention_kernel` names a kernel of
    `jedi_jax.models.attention` (static). `remat=True` rematerialises every transformer block.
    """

    def __init__(self, config: UNetConfig, *, dtype: Any = jnp.float32, attention_kernel: attn_lib.Kernel = "xla",
                 remat: bool = False, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        self.dtype = dtype
        attn_lib.get_kernel(attention_kernel)  # fail fast on unknown names
        boc, n = cfg.block_out_channels, len(cfg.block_out_channels)
        g, eps, ted = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        rngs = KeySequence(rngs)  # cheap abstract init (see KeySequence)
        common = dict(dtype=dtype, rngs=rngs)
        attn_kw = dict(use_linear_projection=cfg.use_linear_projection, kernel=attention_kernel, remat=remat)

        self.conv_in = conv(cfg.in_channels, boc[0], cfg.conv_in_kernel, **common)
        self.time_proj = Timesteps(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(boc[0], ted, **common)
        if cfg.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, ted, **common)

        down = []
        out_ch = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            kw = dict(num_layers=cfg.layers_per_block[i], add_downsample=i < n - 1, groups=g, eps=eps,
                      downsample_padding=cfg.downsample_padding, **common)
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(in_ch, out_ch, ted, heads=cfg.num_heads[i],
                                                 cross_attention_dim=cfg.cross_attention_dim[i],
                                                 transformer_layers=cfg.transformer_layers_per_block[i],
                                                 **attn_kw, **kw))
            else:
                down.append(DownBlock2D(in_ch, out_ch, ted, **kw))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlock2DCrossAttn(
            boc[-1], ted, heads=cfg.num_heads[-1], cross_attention_dim=cfg.cross_attention_dim[-1],
            transformer_layers=cfg.transformer_layers_per_block[-1], groups=g, eps=eps,
            output_scale_factor=cfg.mid_block_scale_factor, **attn_kw, **common)

        up = []
        rev = lambda t: tuple(reversed(t))  # noqa: E731
        r_ch, r_heads, r_layers = rev(boc), rev(cfg.num_heads), rev(cfg.layers_per_block)
        r_cad, r_tl = rev(cfg.cross_attention_dim), rev(cfg.transformer_layers_per_block)
        out_ch = r_ch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, r_ch[i]
            in_ch = r_ch[min(i + 1, n - 1)]
            kw = dict(num_layers=r_layers[i] + 1, add_upsample=i < n - 1, groups=g, eps=eps, **common)
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(in_ch, prev_ch, out_ch, ted, heads=r_heads[i],
                                             cross_attention_dim=r_cad[i], transformer_layers=r_tl[i],
                                             **attn_kw, **kw))
            else:
                up.append(UpBlock2D(in_ch, prev_ch, out_ch, ted, **kw))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = group_norm(boc[0], g, eps, **common)
        self.conv_out = conv(boc[0], cfg.out_channels, cfg.conv_out_kernel, **common)

    def _time_embedding(self, timesteps, B: int, N: int, added_cond) -> jax.Array:
        """Timestep (+ SDXL text_time) embedding per image -> (B*N, time_embed_dim)."""
        t = jnp.asarray(timesteps)
        # (), (1,) (one time for all, as diffusers allows), (B,) (one per set) or (B, N) (one per image)
        if t.ndim > 2 or (t.ndim == 1 and t.shape[0] not in (1, B)) or (t.ndim == 2 and t.shape != (B, N)):
            raise ValueError(f"timesteps must be (), (1,), (B,) = ({B},) or (B, N) = {(B, N)}; got {t.shape}")
        t = t.reshape(-1, 1) if t.ndim == 1 else t  # (B,) or (1,) -> a column: one time per set
        t = jnp.broadcast_to(t, (B, N)).reshape(B * N)  # (B, N) -> (B*N,)
        emb = self.time_embedding(self.time_proj(t).astype(self.dtype))  # (B*N, Ct)
        if self.config.addition_embed_type == "text_time":
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("SDXL UNet needs added_cond={'text_embeds': (B, N, P), 'time_ids': (B, N, 6)}")
            text = jnp.asarray(added_cond["text_embeds"])
            ids = jnp.asarray(added_cond["time_ids"])
            for name, a in (("text_embeds", text), ("time_ids", ids)):  # per set (B, .) or per image (B, N, .)
                if a.shape[:-1] not in ((B,), (B, N)):
                    raise ValueError(f"added_cond[{name!r}] must be (B, X) or (B, N, X) = ({B}, {N}, X); got {a.shape}")
            width = text.shape[-1] + ids.shape[-1] * self.config.addition_time_embed_dim
            if width != self.config.projection_class_embeddings_input_dim:
                raise ValueError(f"text_embeds width {text.shape[-1]} + {ids.shape[-1]} time_ids x "
                                 f"{self.config.addition_time_embed_dim} = {width}, but the UNet's "
                                 f"projection_class_embeddings_input_dim is "
                                 f"{self.config.projection_class_embeddings_input_dim}")
            text = jnp.broadcast_to(text[:, None] if text.ndim == 2 else text, (B, N, text.shape[-1]))
            ids = jnp.broadcast_to(ids[:, None] if ids.ndim == 2 else ids, (B, N, ids.shape[-1]))
            time_embeds = self.add_time_proj(ids.reshape(-1))  # (B*N*6, Ca)
            time_embeds = time_embeds.reshape(B * N, -1)  # (B*N, 6*Ca)
            add = jnp.concatenate([text.reshape(B * N, -1).astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + self.add_embedding(add.astype(self.dtype))  # (B*N, Ct)
        return emb

    def __call__(self, latents, timesteps, context, member_mask=None, added_cond=None) -> jax.Array:
        """latents (B, N, h, w, Cin); timesteps (), (1,), (B,) or (B, N); context (B, N, T, D), one caption per image;
        member_mask (B, N) bool (None = all real); added_cond (SDXL) {'text_embeds': (B, N, P),
        'time_ids': (B, N, 6)}. Returns the prediction (B, N, h, w, Cout) in float32."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, N, h, w, C), got {latents.shape}")
        B, N, h, w, _ = latents.shape
        if context.ndim != 4 or context.shape[:2] != (B, N):
            raise ValueError(f"context must be (B, N, T, D) = ({B}, {N}, T, D), got {context.shape}")
        # Checked here, not left to XLA's conv / dot_general shape errors (JeDi's 2C+1 vs C is easy to mix up)
        if latents.shape[-1] != self.config.in_channels:
            raise ValueError(f"latents have {latents.shape[-1]} channels; this UNet takes in_channels="
                             f"{self.config.in_channels} (a JeDi UNet: noisy latents, known mask, clean references)")
        if context.shape[-1] not in set(self.config.cross_attention_dim):
            raise ValueError(f"context width {context.shape[-1]} does not match the UNet's cross_attention_dim "
                             f"{_compact(self.config.cross_attention_dim)}")
        if member_mask is not None:
            member_mask = jnp.asarray(member_mask).astype(bool)  # (B, N)
        set_kw = dict(num_members=N, member_mask=member_mask)

        emb = self._time_embedding(timesteps, B, N, added_cond)  # (B*N, Ct)
        ctx = context.reshape(B * N, *context.shape[2:]).astype(self.dtype)  # (B, N, T, D) -> (B*N, T, D)
        x = latents.reshape(B * N, h, w, latents.shape[-1]).astype(self.dtype)  # -> (B*N, h, w, Cin)

        x = self.conv_in(x)  # (B*N, h, w, C0)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, ctx, **set_kw)
            skips.extend(res)
        x = self.mid_block(x, emb, ctx, **set_kw)  # (B*N, h/2^k, w/2^k, C-1)

        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            # nearest-upsample to the next skip's size (== 2x unless h, w are not divisible)
            size = skips[-1].shape[1:3] if i < len(self.up_blocks) - 1 else None
            x = block(x, res, emb, ctx, upsample_size=size, **set_kw)

        x = jax.nn.silu(self.conv_norm_out(x))
        x = self.conv_out(x)  # (B*N, h, w, Cout)
        return x.reshape(B, N, h, w, x.shape[-1]).astype(jnp.float32)  # (B*N, ...) -> (B, N, h, w, Cout)
