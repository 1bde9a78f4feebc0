"""Attention kernels behind one registry, and JeDi's coupled self-attention.

Kernels take q (B, Lq, H, D), k/v (B, Lk, H, D) and an optional boolean key mask (B, Lk) and return
(B, Lq, H, D). The softmax is always computed in float32 and scaled by 1/sqrt(D), as diffusers'
`AttnProcessor2_0` (F.scaled_dot_product_attention) does. Masked keys get the large negative logit
that `jax.nn.dot_product_attention` uses, so every kernel agrees with "xla" even on rows whose keys
are all masked (uniform attention over the masked keys, finite output).

* "xla"     reference: `jax.nn.dot_product_attention(implementation="xla")`.
* "cudnn"   GPU flash attention: `jax.nn.dot_product_attention(implementation="cudnn")`. cuDNN takes
            padding as per-batch key lengths, so the key mask must be a prefix mask; see
            `key_mask_to_seq_lengths`.
* "chunked" memory-efficient: `lax.scan` over key chunks with an online (log-sum-exp) softmax;
            never materialises the (Lq, Lk) score matrix. Exact up to float rounding.

`coupled_self_attention` is JeDi's coupled self-attention (Zeng et al., CVPR 2024, section 3): the
self-attention of every image attends to the tokens of all images in its set. It is the only
function in the code base that knows about the set axis N.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KernelFn = Callable[..., jax.Array]  # fn(q, k, v, key_mask) -> out
Kernel = Union[str, KernelFn]

_KERNELS: dict[str, KernelFn] = {}

DEFAULT_CHUNK_SIZE = 1024


def register_kernel(name: str, fn: KernelFn) -> None:
    """Registers `fn(q, k, v, key_mask) -> out` under `name` (overwrites an existing entry)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"kernel name must be a non-empty string, got {name!r}")
    _KERNELS[name] = fn


def get_kernel(name: Kernel) -> KernelFn:
    """Looks a kernel up by name (a callable is returned as is)."""
    if callable(name):
        return name
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention kernel {name!r}; known kernels: {sorted(_KERNELS)}"
        ) from None


def available_kernels() -> tuple[str, ...]:
    return tuple(sorted(_KERNELS))


def _large_negative() -> jax.Array:
    # Same value jax.nn.dot_product_attention uses for masked logits (float32 logits).
    return jnp.asarray(-0.7 * float(np.finfo(np.float32).max), dtype=jnp.float32)


def _check_shapes(q, k, v, key_mask) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q/k/v must be (B, L, H, D); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
    if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_mask must be (B, Lk) = {(k.shape[0], k.shape[1])}, got {key_mask.shape}")


# ----------------------------------------------------------------------------------------- xla
def xla_attention(q, k, v, key_mask=None):
    """Reference kernel: jax.nn.dot_product_attention, XLA implementation (float32 softmax)."""
    mask = None
    if key_mask is not None:
        mask = key_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, Lk), broadcast over heads and queries
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


# --------------------------------------------------------------------------------------- cudnn
def _raise_if_not_prefix(ok) -> None:
    if not bool(np.all(ok)):
        raise ValueError(
            "cudnn attention kernel: key_mask must be a prefix mask (valid keys first, then padding) "
            f"for every batch row; non-prefix rows: {np.nonzero(~np.asarray(ok))[0].tolist()}. "
            "Put valid set members first or use kernel='xla'/'chunked'."
        )


def key_mask_to_seq_lengths(key_mask) -> tuple[jax.Array, jax.Array]:
    """(B, Lk) bool prefix mask -> (key_value_seq_lengths (B,) int32, is_prefix (B,) bool).

    Pure function. Row b is a valid prefix mask iff key_mask[b] == (arange(Lk) < length[b]).
    """
    key_mask = jnp.asarray(key_mask).astype(bool)  # (B, Lk)
    lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)  # (B,)
    positions = jnp.arange(key_mask.shape[-1], dtype=jnp.int32)  # (Lk,)
    is_prefix = jnp.all(key_mask == (positions[None, :] < lengths[:, None]), axis=-1)  # (B,)
    return lengths, is_prefix


def checked_seq_lengths(key_mask) -> tuple[jax.Array, jax.Array]:
    """Like `key_mask_to_seq_lengths`, but rejects non-prefix masks.

    Concrete masks raise ValueError right away. Traced masks (inside jit) cannot raise at trace
    time: a `jax.debug.callback` raises when the program runs, and the caller poisons the rows with
    NaN so a wrong result can never pass silently.
    """
    lengths, is_prefix = key_mask_to_seq_lengths(key_mask)
    if isinstance(is_prefix, jax.core.Tracer):
        jax.debug.callback(_raise_if_not_prefix, is_prefix)
    else:
        _raise_if_not_prefix(np.asarray(is_prefix))
    return lengths, is_prefix


CUDNN_KEY_MULTIPLE = 8


def pad_keys(k, v, key_mask=None, multiple: int = CUDNN_KEY_MULTIPLE):
    """Pads k / v (B, Lk, H, D) along Lk to a multiple of `multiple`, the padding masked out.

    cuDNN's training (backward) kernels reject odd key lengths, e.g. the 77 CLIP tokens of SD's
    cross-attention ("Unsupported sequence length Q 4096, KV 77" on an H200). Padded keys are
    invalid keys at the END of each row, so a prefix mask stays a prefix mask. Returns
    (k, v, key_mask) with key_mask (B, Lk') bool, or the inputs unchanged when no padding is needed.
    """
    lk = k.shape[1]
    pad = (-lk) % multiple
    if pad == 0:
        return k, v, key_mask
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    if key_mask is None:
        key_mask = jnp.ones(k.shape[:2], bool)  # (B, Lk)
    key_mask = jnp.pad(jnp.asarray(key_mask).astype(bool), ((0, 0), (0, pad)))  # (B, Lk + pad), pad False
    return jnp.pad(k, widths), jnp.pad(v, widths), key_mask


def cudnn_attention(q, k, v, key_mask=None):
    """cuDNN flash attention (GPU only; bf16/fp16; head dim a multiple of 8, <= 128, <= 256 on Hopper).

    A key mask must be a prefix mask (see module doc). Key lengths are padded to a multiple of 8."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cudnn attention kernel needs bfloat16/float16 inputs (UNet dtype=bfloat16), got {q.dtype}")
    given = key_mask is not None
    lk = k.shape[1]
    k, v, key_mask = pad_keys(k, v, key_mask)
    if key_mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if not given:  # only pad_keys' padding (SD's 77 text tokens): the lengths are static, nothing to check,
        # so cross-attention gets no host callback (one per layer per step otherwise)
        lengths = jnp.full((k.shape[0],), lk, jnp.int32)  # (B,)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    lengths, is_prefix = checked_seq_lengths(key_mask)  # (B,), (B,)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return jnp.where(is_prefix[:, None, None, None], out, jnp.nan).astype(out.dtype)  # (B, Lq, H, D)


# ------------------------------------------------------------------------------------- chunked
def chunked_attention(q, k, v, key_mask=None, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Memory-efficient attention: scan over key chunks with an online log-sum-exp softmax.

    Peak memory is O(B*H*Lq*chunk_size) instead of O(B*H*Lq*Lk); the scan body is rematerialised
    under differentiation so the backward pass does not store the scores either.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    chunk = int(min(chunk_size, Lk))
    n_chunks = -(-Lk // chunk)
    pad = n_chunks * chunk - Lk
    scale = 1.0 / math.sqrt(D)
    neg = _large_negative()

    user_mask = jnp.ones((B, Lk), bool) if key_mask is None else key_mask.astype(bool)  # (B, Lk)
    exists = jnp.ones((B, Lk), bool)  # (B, Lk): False only for the padding added here
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))  # (B, Lk+pad, H, D)
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))  # (B, Lk+pad, H, D)
        user_mask = jnp.pad(user_mask, ((0, 0), (0, pad)))  # (B, Lk+pad)
        exists = jnp.pad(exists, ((0, 0), (0, pad)))  # (B, Lk+pad)
    # chunk-major layout for the scan
    k_c = k.reshape(B, n_chunks, chunk, H, D).transpose(1, 0, 2, 3, 4)  # (n, B, C, H, D)
    v_c = v.reshape(B, n_chunks, chunk, H, D).transpose(1, 0, 2, 3, 4)  # (n, B, C, H, D)
    m_c = user_mask.reshape(B, n_chunks, chunk).transpose(1, 0, 2)  # (n, B, C)
    e_c = exists.reshape(B, n_chunks, chunk).transpose(1, 0, 2)  # (n, B, C)

    @jax.checkpoint
    def body(carry, xs):
        acc, row_max, row_sum = carry  # (B, H, Lq, D) f32, (B, H, Lq) f32, (B, H, Lq) f32
        kc, vc, mc, ec = xs
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kc, preferred_element_type=jnp.float32)  # (B, H, Lq, C)
        s = s * jnp.float32(scale)
        s = jnp.where(mc[:, None, None, :], s, neg)  # masked keys: same constant as the xla kernel
        s = jnp.where(ec[:, None, None, :], s, -jnp.inf)  # chunk padding: excluded entirely
        new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))  # (B, H, Lq); finite: chunk has a real key
        p = jnp.exp(s - new_max[..., None])  # (B, H, Lq, C)
        correction = jnp.exp(row_max - new_max)  # (B, H, Lq); 0 on the first chunk (row_max = -inf)
        row_sum = row_sum * correction + jnp.sum(p, axis=-1)  # (B, H, Lq)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + pv  # (B, H, Lq, D)
        return (acc, new_max, row_sum), None

    init = (
        jnp.zeros((B, H, Lq, D), jnp.float32),
        jnp.full((B, H, Lq), -jnp.inf, jnp.float32),
        jnp.zeros((B, H, Lq), jnp.float32),
    )
    (acc, _, row_sum), _ = lax.scan(body, init, (k_c, v_c, m_c, e_c))
    out = acc / row_sum[..., None]  # (B, H, Lq, D)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)  # (B, Lq, H, D)


def make_chunked_kernel(chunk_size: int) -> KernelFn:
    """A "chunked" kernel with a fixed chunk size, e.g. `register_kernel("chunked_256", make_chunked_kernel(256))`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return functools.partial(chunked_attention, chunk_size=int(chunk_size))


register_kernel("xla", xla_attention)
register_kernel("cudnn", cudnn_attention)
register_kernel("chunked", chunked_attention)


# ---------------------------------------------------------------------------------- public API
def dot_product_attention(q, k, v, *, key_mask=None, kernel: Kernel = "xla"):
    """Scaled dot-product attention. q (B, Lq, H, D), k/v (B, Lk, H, D), key_mask (B, Lk) bool.

    Returns (B, Lq, H, D) in q's dtype. `kernel` is a registered name (static, chosen by config)
    or a callable `fn(q, k, v, key_mask)`.
    """
    _check_shapes(q, k, v, key_mask)
    return get_kernel(kernel)(q, k, v, key_mask)


def coupled_self_attention(q, k, v, *, num_members: int, member_mask=None, kernel: Kernel = "xla"):
    """JeDi coupled self-attention (Zeng et al., CVPR 2024, section 3).

    q/k/v are per-image self-attention projections (B*N, L, H, D), set members contiguous along the
    batch axis (index b*N + n). Every image's queries attend to the keys of all N images of its set;
    keys of members whose `member_mask` (B, N) is False are masked out (and zeroed), so padded or
    dropped members never influence valid ones, whatever they hold (NaN and inf included). With N == 1 and no mask this is plain self-attention.
    Returns (B*N, L, H, D).
    """
    BN, L, H, D = q.shape
    N = int(num_members)
    if N < 1 or BN % N:
        raise ValueError(f"batch {BN} is not a multiple of num_members={N}")
    B = BN // N
    q_set = q.reshape(B, N * L, H, D)  # (B*N, L, H, D) -> (B, N*L, H, D)
    k_set = k.reshape(B, N * L, H, D)  # (B*N, L, H, D) -> (B, N*L, H, D)
    v_set = v.reshape(B, N * L, H, D)  # (B*N, L, H, D) -> (B, N*L, H, D)
    key_mask = None
    if member_mask is not None:
        member_mask = jnp.asarray(member_mask).astype(bool)
        if member_mask.shape != (B, N):
            raise ValueError(f"member_mask must be (B, N) = {(B, N)}, got {member_mask.shape}")
        key_mask = jnp.repeat(member_mask, L, axis=1)  # (B, N) -> (B, N*L), member n owns keys [n*L, (n+1)*L)
        # Masked keys get zero weight, but 0 * NaN is NaN: a padded member holding NaN or inf would
        # still poison every valid member. Zeroing its keys and values makes valid outputs exactly
        # independent of what padded members hold (their own queries are left as they are).
        keep = key_mask[:, :, None, None]  # (B, N*L, 1, 1)
        k_set = jnp.where(keep, k_set, jnp.zeros((), k_set.dtype))
        v_set = jnp.where(keep, v_set, jnp.zeros((), v_set.dtype))
    out = dot_product_attention(q_set, k_set, v_set, key_mask=key_mask, kernel=kernel)  # (B, N*L, H, D)
    return out.reshape(BN, L, H, D)  # (B, N*L, H, D) -> (B*N, L, H, D)
