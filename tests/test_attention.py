"""Attention kernels and JeDi coupled self-attention (jedi_jax/models/attention.py).

Every kernel must equal the "xla" reference (with and without key masks); coupled attention must
equal a hand-written per-set reference; padded members must not influence valid ones. The real
cuDNN numeric checks run only where JAX sees a GPU: `make test` and conftest pin JAX to the CPU, so
on a GPU machine run them as `JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py -k gpu`
(they skip, and say so, everywhere else: the 5 skips of a CPU run).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jedi_jax.models import attention as A

TOL = 2e-5


def _qkv(seed, B, Lq, Lk, H, D, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Lq, H, D)).astype(dtype)
    k = rng.standard_normal((B, Lk, H, D)).astype(dtype)
    v = rng.standard_normal((B, Lk, H, D)).astype(dtype)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _random_mask(seed, B, Lk, p=0.6, at_least_one=True):
    m = np.random.default_rng(seed).random((B, Lk)) < p
    if at_least_one:
        m[:, 0] = True
    return jnp.asarray(m)


A.register_kernel("chunked_7", A.make_chunked_kernel(7))  # ragged last chunks for Lk = 29 and 64 (one chunk at 7)
CPU_KERNELS = ["xla", "chunked", "chunked_7"]
SHAPES = [(2, 13, 29, 3, 8), (1, 64, 64, 2, 16), (2, 33, 7, 4, 40)]


def _numpy_attention(q, k, v, key_mask=None):
    """Plain float64 softmax attention; masked keys are *dropped* (rows must keep one valid key)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        s = np.where(np.asarray(key_mask)[:, None, None, :], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_registry():
    assert {"xla", "cudnn", "chunked"} <= set(A.available_kernels())
    assert A.get_kernel("xla") is A.xla_attention
    with pytest.raises(ValueError, match="known kernels.*chunked.*cudnn.*xla"):
        A.get_kernel("flash9000")
    fn = lambda q, k, v, m: A.xla_attention(q, k, v, m)  # noqa: E731
    A.register_kernel("test_custom", fn)
    assert A.get_kernel("test_custom") is fn
    assert A.get_kernel(fn) is fn  # callables pass through


@functools.lru_cache(maxsize=None)
def _jitted(kernel):
    """One compiled program per kernel (and shape): unmasked and masked outputs together."""
    return jax.jit(lambda q, k, v, m: (A.dot_product_attention(q, k, v, kernel=kernel),
                                       A.dot_product_attention(q, k, v, key_mask=m, kernel=kernel)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_kernels_equal_reference(kernel, shape):
    q, k, v = _qkv(sum(shape), *shape)
    mask = _random_mask(sum(shape), shape[0], shape[2])
    out, out_m = _jitted(kernel)(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out_m), _numpy_attention(q, k, v, mask), atol=TOL, rtol=0)
    if kernel != "xla":
        ref, ref_m = _jitted("xla")(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out_m), np.asarray(ref_m), atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", ["chunked", "chunked_7"])
def test_chunked_fully_masked_rows_match_xla(kernel):
    """A batch row without any valid key: every kernel gives xla's finite uniform average."""
    q, k, v = _qkv(3, 2, 9, 20, 2, 8)
    mask = np.ones((2, 20), bool)
    mask[1] = False
    out = _jitted(kernel)(q, k, v, jnp.asarray(mask))[1]
    ref = _jitted("xla")(q, k, v, jnp.asarray(mask))[1]
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)


def test_chunked_gradient_equals_xla():
    q, k, v = _qkv(5, 1, 6, 15, 2, 4)
    mask = _random_mask(6, 1, 15)

    def loss(kernel):
        return lambda q, k, v: jnp.sum(jnp.sin(A.dot_product_attention(q, k, v, key_mask=mask, kernel=kernel)))

    g_ref = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    g = jax.jit(jax.grad(loss("chunked_7"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_chunked_bf16_close():
    q, k, v = _qkv(7, 2, 16, 40, 2, 16)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = _jitted("chunked_7")(*bf, None)[0]
    ref = _jitted("xla")(*bf, None)[0]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2, rtol=0)


def test_key_mask_checks():
    q, k, v = _qkv(0, 2, 4, 6, 1, 4)
    with pytest.raises(ValueError, match="key_mask must be"):
        A.dot_product_attention(q, k, v, key_mask=jnp.ones((2, 5), bool))


# ------------------------------------------------------------------------------ cudnn helpers
def test_seq_lengths_from_prefix_masks():
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
    lengths, ok = A.key_mask_to_seq_lengths(jnp.asarray(mask))
    assert lengths.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(lengths), [3, 6, 0, 1])
    assert np.asarray(ok).all()
    lengths2, _ = A.checked_seq_lengths(jnp.asarray(mask))  # concrete prefix masks pass
    np.testing.assert_array_equal(np.asarray(lengths2), [3, 6, 0, 1])


def test_seq_lengths_reject_non_prefix_masks():
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], bool)
    _, ok = A.key_mask_to_seq_lengths(jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(ok), [True, False, False])
    with pytest.raises(ValueError, match=r"prefix mask.*\[1, 2\]"):
        A.checked_seq_lengths(jnp.asarray(mask))
    # traced masks: the check raises when the jitted program runs
    f = jax.jit(lambda m: A.checked_seq_lengths(m)[0])
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(mask[:1]))), [2])
    with pytest.raises(Exception, match="prefix mask"):
        jax.block_until_ready(f(jnp.asarray(mask)))


def test_coupled_member_mask_is_prefix_for_valid_members_first():
    """cuDNN can serve coupled attention whenever valid members come first: check the key mask."""
    member_mask = jnp.asarray([[True, True, False], [True, False, False], [True, True, True]])
    key_mask = jnp.repeat(member_mask, 5, axis=1)  # what coupled_self_attention builds, L = 5
    lengths, ok = A.key_mask_to_seq_lengths(key_mask)
    np.testing.assert_array_equal(np.asarray(lengths), [10, 5, 15])
    assert np.asarray(ok).all()



@pytest.mark.parametrize("with_mask", [False, True])
def test_pad_keys_to_multiple_of_8_keeps_attention_and_prefix(with_mask):
    """The cuDNN path pads CLIP's 77 keys to 80 (odd key lengths fail its backward): masked padding
    must leave attention unchanged (checked with the xla kernel) and a prefix mask a prefix mask."""
    q, k, v = _qkv(3, 2, 6, 77, 2, 8)
    mask = jnp.asarray(np.arange(77)[None, :] < np.array([[77], [40]])) if with_mask else None
    k2, v2, m2 = A.pad_keys(k, v, mask)
    assert k2.shape == v2.shape == (2, 80, 2, 8) and m2.shape == (2, 80)
    assert not np.asarray(m2)[:, 77:].any() and (np.asarray(k2)[:, 77:] == 0).all()
    lengths, ok = A.key_mask_to_seq_lengths(m2)
    np.testing.assert_array_equal(np.asarray(lengths), [77, 40] if with_mask else [77, 77])
    assert np.asarray(ok).all()
    want = A.dot_product_attention(q, k, v, key_mask=mask, kernel="xla")
    got = A.dot_product_attention(q, k2, v2, key_mask=m2, kernel="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    k3, v3, m3 = A.pad_keys(k2, v2, m2)  # already a multiple: untouched
    assert k3 is k2 and m3 is m2


def test_cudnn_path_checks_only_user_masks_and_matches_xla(monkeypatch):
    """CPU stand-in for cuDNN (the xla kernel honouring key_value_seq_lengths, as cuDNN does): 77 text
    keys with no mask get padded to 80 and need no host-side prefix check (it would run in every
    cross-attention of every step); a user's member mask is still checked. Outputs equal xla's."""
    real = jax.nn.dot_product_attention
    cudnn_calls = []

    def stand_in(q, k, v, *, implementation=None, **kw):
        if implementation == "cudnn":
            cudnn_calls.append(k.shape[1])
            implementation = "xla"
        return real(q, k, v, implementation=implementation, **kw)

    monkeypatch.setattr(A.jax.nn, "dot_product_attention", stand_in)
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(5, 2, 16, 77, 2, 8))
    assert "callback" not in str(jax.make_jaxpr(A.cudnn_attention)(q, k, v))
    mask = jnp.asarray(np.arange(77)[None, :] < np.array([[77], [30]]))
    assert "callback" in str(jax.make_jaxpr(A.cudnn_attention)(q, k, v, mask))  # checked when it runs
    for m in (None, mask):
        got = jax.jit(A.cudnn_attention)(q, k, v, m)
        want = A.xla_attention(q, k, v, m)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
    assert cudnn_calls and set(cudnn_calls) == {80}  # cuDNN saw the keys padded to a multiple of 8


def _has_gpu():
    try:
        return jax.default_backend() in ("gpu", "cuda") or any(d.platform in ("gpu", "cuda") for d in jax.devices())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128])
def test_cudnn_equals_xla_on_gpu(head_dim):
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(head_dim, 2, 96, 96, 4, head_dim))
    mask = jnp.asarray(np.arange(96)[None, :] < np.array([[96], [40]]))  # prefix masks
    for m in (None, mask):
        out = jax.jit(lambda q, k, v, m: A.dot_product_attention(q, k, v, key_mask=m, kernel="cudnn"))(q, k, v, m)
        ref = A.dot_product_attention(q, k, v, key_mask=m, kernel="xla")
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        print(f"cudnn vs xla head_dim={head_dim} mask={m is not None}: max abs {err:.2e}")
        assert err < 2e-2
    qs, ks, vs = (x[:, :48] for x in (q, k, v))  # (B*N, L, H, D) = (2, 48, 4, head_dim): one set of 2
    member_mask = jnp.asarray([[True, False]])
    out = A.coupled_self_attention(qs, ks, vs, num_members=2, member_mask=member_mask, kernel="cudnn")
    ref = A.coupled_self_attention(qs, ks, vs, num_members=2, member_mask=member_mask, kernel="xla")
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)))) < 2e-2



@pytest.mark.skipif(not _has_gpu(), reason="cuDNN attention needs a GPU")
def test_cudnn_gradient_with_77_clip_keys_on_gpu():
    """SD cross-attention under training: 4096 queries, 77 keys (failed before keys were padded)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(7, 2, 256, 77, 2, 40))
    loss = lambda kern: lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, kernel=kern).astype(jnp.float32) ** 2)
    g = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, ref):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) < 3e-2 * scale

# ---------------------------------------------------------------------- coupled self-attention
def _naive_coupled(q, k, v, N, member_mask):
    """Per set b, per member n: softmax over the keys of all *valid* members of set b (explicit loops)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    BN, L, H, D = q.shape
    out = np.zeros_like(q)
    for b in range(BN // N):
        valid = [m for m in range(N) if member_mask is None or bool(member_mask[b, m])]
        keys = np.concatenate([k[b * N + m] for m in valid], axis=0)  # (|valid|*L, H, D)
        vals = np.concatenate([v[b * N + m] for m in valid], axis=0)
        for n in range(N):
            s = np.einsum("qhd,khd->hqk", q[b * N + n], keys) / math.sqrt(D)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b * N + n] = np.einsum("hqk,khd->qhd", p, vals)
    return out


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("B,N,L,H,D", [(2, 3, 6, 2, 8), (3, 2, 5, 1, 8)])
def test_coupled_equals_naive(kernel, B, N, L, H, D):
    q, k, v = _qkv(B * N + L, B * N, L, L, H, D)
    mm = np.random.default_rng(L).random((B, N)) < 0.5
    mm[:, -1] = True  # at least one valid member per set (need not be a prefix)
    f = jax.jit(lambda q, k, v, mm: (A.coupled_self_attention(q, k, v, num_members=N, kernel=kernel),
                                     A.coupled_self_attention(q, k, v, num_members=N, member_mask=mm,
                                                              kernel=kernel)))
    out, out_m = f(q, k, v, jnp.asarray(mm))
    np.testing.assert_allclose(np.asarray(out), _naive_coupled(q, k, v, N, None), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out_m), _naive_coupled(q, k, v, N, mm), atol=TOL, rtol=0)


def test_coupled_n1_is_plain_self_attention():
    q, k, v = _qkv(11, 4, 10, 10, 2, 8)
    out = A.coupled_self_attention(q, k, v, num_members=1)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v), atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_padded_members_do_not_affect_valid_members(kernel):
    B, N, L, H, D = 2, 4, 7, 2, 8
    q, k, v = _qkv(21, B * N, L, L, H, D)
    mm = np.array([[True, False, True, False], [True, True, True, False]])
    f = jax.jit(lambda q, k, v: A.coupled_self_attention(q, k, v, num_members=N, member_mask=jnp.asarray(mm),
                                                         kernel=kernel))
    out = f(q, k, v)
    # overwrite the padded members with large garbage
    pad = ~mm.reshape(-1)  # (B*N,)
    garbage = _qkv(99, B * N, L, L, H, D)
    q2, k2, v2 = (jnp.where(pad[:, None, None, None], 100 * g, x) for g, x in zip(garbage, (q, k, v)))
    out2 = f(q2, k2, v2)
    valid = mm.reshape(-1)
    np.testing.assert_allclose(np.asarray(out2)[valid], np.asarray(out)[valid], atol=1e-6, rtol=0)
    # non-finite padding too: masked weights are 0, and 0 * NaN would be NaN without the zeroing
    for bad in (jnp.nan, jnp.inf):
        q3, k3, v3 = (jnp.where(pad[:, None, None, None], bad, x) for x in (q, k, v))
        out3 = np.asarray(f(q3, k3, v3))
        assert np.isfinite(out3[valid]).all(), (kernel, bad)
        np.testing.assert_allclose(out3[valid], np.asarray(out)[valid], atol=1e-6, rtol=0)
    # and equals attending over the valid members alone
    ref = _naive_coupled(q, k, v, N, mm)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=TOL, rtol=0)


def test_coupled_shape_errors():
    q, k, v = _qkv(0, 6, 4, 4, 1, 4)
    with pytest.raises(ValueError, match="multiple of num_members"):
        A.coupled_self_attention(q, k, v, num_members=4)
    with pytest.raises(ValueError, match="member_mask must be"):
        A.coupled_self_attention(q, k, v, num_members=3, member_mask=jnp.ones((3, 2), bool))
