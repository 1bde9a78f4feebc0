"""The CLIP text encoder (Stable Diffusion's `text_encoder`, SDXL's `text_encoder_2`) in Flax NNX.

Mirrors transformers 5.x `models/clip/modeling_clip.py`: `CLIPTextModel` (with its
`CLIPTextEmbeddings`, `CLIPEncoder`, `CLIPEncoderLayer`, `CLIPAttention`, `CLIPMLP`) and
`CLIPTextModelWithProjection`. Pre-LayerNorm transformer with a causal self-attention mask.

Parameter paths equal the state-dict keys of the checkpoint files (docs/DESIGN.md):
`text_model.embeddings.token_embedding.embedding`, `text_model.encoder.layers.3.self_attn.q_proj.kernel`,
`text_model.final_layer_norm.scale`, and `text_projection.kernel` for the projection model. (The
files were written by transformers 4, where `CLIPTextModel` nested a `text_model`; transformers 5's
in-memory `CLIPTextModel` drops that prefix, `CLIPTextModelWithProjection` keeps it.)
`position_ids` is a buffer in torch; here it is `arange(T)`, not a parameter.

Which hidden state conditions the UNet: see `prompt_embeddings`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jedi_jax.models.layers import layer_norm, linear

ACTIVATIONS = ("quick_gelu", "gelu")  # of transformers' CLIP and ViT configs (hidden_act)
_FIELDS_FROM_TRANSFORMERS = (
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
    "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers `CLIPTextConfig` fields we model (defaults = transformers' defaults).

    SD1.x: hidden 768, 12 layers, 12 heads, quick_gelu. SD2.x (diffusers format): hidden 1024,
    23 layers, 16 heads, gelu. SDXL text_encoder_2: hidden 1280, 32 layers, 20 heads, gelu,
    projection 1280.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP text config: unsupported hidden_act={self.hidden_act!r} (supported: {ACTIVATIONS})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"CLIP text config: eos_token_id must be one int, got {self.eos_token_id!r}")

    @classmethod
    def from_transformers(cls, d: dict, strict: bool = False) -> "CLIPTextConfig":
        """From a transformers `CLIPTextConfig` config.json dict (or a full `CLIPConfig` dict with a
        `text_config`). Keys we do not model (attention_dropout: training only; initializer_*,
        architectures, torch_dtype, ...) are ignored, unless `strict` (a random-init architecture
        written by hand in a training config: there a key we do not read is a typo, ValueError)."""
        if "text_config" in d and isinstance(d["text_config"], dict):
            d = d["text_config"]
        if strict and (unknown := sorted(k for k in d if k not in _FIELDS_FROM_TRANSFORMERS)):
            raise ValueError(f"unknown text encoder config keys {unknown} (known: {', '.join(_FIELDS_FROM_TRANSFORMERS)})")
        kwargs = {k: d[k] for k in _FIELDS_FROM_TRANSFORMERS if k in d and d[k] is not None}
        return cls(**kwargs)

    def to_transformers(self) -> dict:
        """A dict that `transformers.CLIPTextConfig(**d)` accepts."""
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def check_vocabulary(num_tokens: int, cfg: CLIPTextConfig) -> None:
    """A tokenizer of `num_tokens` ids must fit the embedding table: jnp.take fills an out-of-range
    id with NaN, which the causal attention spreads over the whole prompt without any error."""
    if num_tokens > cfg.vocab_size:
        raise ValueError(f"tokenizer has {num_tokens} tokens but the text encoder's vocab_size is {cfg.vocab_size}: "
                         "ids beyond it would embed as NaN")


@struct.dataclass
class CLIPTextOutput:
    """Mirrors transformers' `BaseModelOutputWithPooling` / `CLIPTextModelOutput` (a jax pytree)."""

    last_hidden_state: jax.Array  # (B, T, D), after final_layer_norm
    pooler_output: jax.Array  # (B, D), last_hidden_state at the eos position
    hidden_states: tuple | None = None  # L+1 entries of (B, T, D): embeddings, then each layer (no final LN)
    text_embeds: jax.Array | None = None  # (B, P), projection of pooler_output (WithProjection only)


def _layer_norm(cfg: CLIPTextConfig, dtype, rngs) -> nnx.LayerNorm:
    return layer_norm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)


def _linear(din: int, dout: int, dtype, rngs, use_bias: bool = True) -> nnx.Linear:
    return linear(din, dout, dtype=dtype, rngs=rngs, use_bias=use_bias)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:  # (B, T) int -> (B, T, D)
        t = input_ids.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ValueError(f"sequence length {t} > max_position_embeddings {self.position_embedding.num_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


def activation(name: str, h: jax.Array) -> jax.Array:
    """hidden_act of CLIP / ViT: transformers' QuickGELUActivation or GELUActivation (exact, erf)."""
    if name == "quick_gelu":
        return h * jax.nn.sigmoid(1.702 * h)
    return jax.nn.gelu(h, approximate=False)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                         mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention over heads, float32 softmax (transformers' eager CLIP / ViT path).
    q, k, v (B, T, D); mask (B, 1, T, T) bool, True = query may attend to key, or None -> (B, T, D)."""
    b, t, d = q.shape
    head_dim = d // num_heads
    split = lambda y: y.reshape(b, t, num_heads, head_dim)  # noqa: E731  (B, T, H, Dh)
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    if mask is not None:  # a finite fill (transformers' eager path adds finfo.min) keeps masked rows NaN-free
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, H, T, T)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention, scale head_dim**-0.5, float32 softmax (transformers `CLIPAttention`)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = _linear(d, d, dtype, rngs)
        self.v_proj = _linear(d, d, dtype, rngs)
        self.q_proj = _linear(d, d, dtype, rngs)
        self.out_proj = _linear(d, d, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, D); mask (B, 1, T, T) bool, True = query may attend to key -> (B, T, D)."""
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, mask)
        return self.out_proj(out)  # (B, T, D)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.hidden_act, self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(cfg, dtype, rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:  # (B, T, D) -> (B, T, D)
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


def attention_mask_2d(input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Causal mask AND key padding mask: (B, T) ids, optional (B, T) {0,1} mask -> (B, 1, T, T) bool."""
    t = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return jnp.broadcast_to(mask, (input_ids.shape[0], 1, t, t))


class CLIPTextTransformer(nnx.Module):
    """The body of transformers' `CLIPTextModel` (v4 name `CLIPTextTransformer`): embeddings,
    encoder, final_layer_norm, eos pooling."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(cfg, dtype, rngs)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        mask = attention_mask_2d(input_ids, attention_mask)
        h = self.embeddings(input_ids)  # (B, T, D)
        hidden = [h]
        for layer in self.encoder.layers:
            h = layer(h, mask)
            hidden.append(h)
        last = self.final_layer_norm(h)
        if self.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773): eos is the highest id in the sequence.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first position holding eos_token_id (padding may equal eos)
            eos_pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # (B, D)
        return CLIPTextOutput(last, pooled, tuple(hidden) if output_hidden_states else None)


class CLIPTextModel(nnx.Module):
    """transformers `CLIPTextModel`. input_ids (B, T) int -> `CLIPTextOutput`."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nnx.Module):
    """transformers `CLIPTextModelWithProjection` (SDXL text_encoder_2): adds `text_embeds`
    = text_projection(pooler_output), a bias-free Linear hidden_size -> projection_dim."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)
        self.text_projection = _linear(config.hidden_size, config.projection_dim, dtype, rngs, use_bias=False)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))


# Named conditioning layers -> index into hidden_states (0 = token + position embeddings).
NAMED_LAYERS = {"last": -1, "penultimate": -2, "embeddings": 0}
# "tokens": final_layer_norm(token embeddings) WITHOUT the position embeddings (encode_prompts only:
# no hidden state holds it). Every word is one vector wherever it stands: a bag of words, which is all
# a mini-world caption needs (each label has its own words). Why: with "embeddings" a one-word shift
# moves a word's vector more than changing the word does (a frozen random position table as large as
# the token table); model card, "Prompt following" (in full: assets/jedi_mini/EXPERIMENTS.md).
TOKEN_LAYER = "tokens"
TEXT_LAYERS = tuple(NAMED_LAYERS) + (TOKEN_LAYER,)


def prompt_embeddings(outputs: CLIPTextOutput, layer: str | int = "last", apply_final_norm: bool | None = None,
                      final_layer_norm: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The (B, T, D) sequence that conditions the UNet (cross-attention context).

    layer="last", apply_final_norm=True (default for "last"): `last_hidden_state`
        -> SD1.x (and SD2.x as diffusers stores it: the converted OpenCLIP-H text encoder already has
        its last block removed, 23 layers, so its "last" IS the penultimate block + final LN).
    layer="penultimate", apply_final_norm=False (default for "penultimate"): `hidden_states[-2]`
        -> SDXL, both encoders (diffusers `StableDiffusionXLPipeline.encode_prompt`, clip_skip=None).
    layer="penultimate", apply_final_norm=True: `final_layer_norm(hidden_states[-2])`
        -> diffusers `StableDiffusionPipeline` with clip_skip=1, i.e. SD2 semantics on a full
        24-layer OpenCLIP-H; pass `final_layer_norm=model.text_model.final_layer_norm`.
    layer=int i: `hidden_states[i]` (e.g. -(clip_skip + 1)), normed only if apply_final_norm.
    layer="embeddings" (normed by default): `final_layer_norm(hidden_states[0])`, token + position
        embeddings before any attention, so no token's vector depends on another token (a frozen
        *random* encoder mixes the words; see eval.prompt_probe.text_sensitivity).

    `outputs` must come from a call with output_hidden_states=True unless layer="last" with the norm.
    """
    if apply_final_norm is None:
        apply_final_norm = layer in ("last", "embeddings")
    if layer == "last" and apply_final_norm:
        return outputs.last_hidden_state
    index = NAMED_LAYERS.get(layer, layer)
    if not isinstance(index, int):
        hint = " ('tokens' comes from encode_prompts: no hidden state holds it)" if layer == TOKEN_LAYER else ""
        raise ValueError(f"layer must be one of {list(NAMED_LAYERS)} or an int, got {layer!r}{hint}")
    if outputs.hidden_states is None:
        raise ValueError("prompt_embeddings needs outputs from output_hidden_states=True")
    h = outputs.hidden_states[index]
    if apply_final_norm:
        if final_layer_norm is None:
            raise ValueError("apply_final_norm=True on a non-final layer needs final_layer_norm=model.text_model.final_layer_norm")
        h = final_layer_norm(h)
    return h


def encode_prompts(model: "CLIPTextModel", input_ids: jax.Array, layer: str | int = "last") -> jax.Array:
    """Token ids (M, T) -> the UNet's cross-attention context (M, T, D) in float32, taken at `layer`
    (see prompt_embeddings; layer="tokens": the normed token embeddings alone, TOKEN_LAYER). The one
    place pipelines and training turn prompts into context."""
    if layer == TOKEN_LAYER:
        text = model.text_model
        return text.final_layer_norm(text.embeddings.token_embedding(input_ids)).astype(jnp.float32)  # (M, T, D)
    hidden = layer != "last"
    outputs = model(input_ids, output_hidden_states=hidden)
    norm = model.text_model.final_layer_norm if hidden else None
    return prompt_embeddings(outputs, layer=layer, final_layer_norm=norm).astype(jnp.float32)


def pooled_text_embeds(outputs: CLIPTextOutput) -> jax.Array:
    """SDXL's pooled conditioning: `text_embeds` of text_encoder_2 (B, projection_dim)."""
    if outputs.text_embeds is None:
        raise ValueError("pooled_text_embeds needs a CLIPTextModelWithProjection output")
    return outputs.text_embeds


__all__ = ["NAMED_LAYERS", "TOKEN_LAYER", "TEXT_LAYERS", "CLIPTextConfig", "CLIPTextOutput", "CLIPTextModel", "CLIPTextModelWithProjection",
           "prompt_embeddings", "encode_prompts", "pooled_text_embeds", "attention_mask_2d"]
