"""Set semantics of the JeDi UNet (coupled self-attention, JeDi section 3), on a tiny random config.

Invariants: sets of one are plain per-image Stable Diffusion; members are exchangeable (permuting
them permutes the outputs); padded members (member_mask False) have no influence on valid ones;
coupling does make members interact; remat, the chunked kernel and bf16 compute give the same
function.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jedi_jax.models import attention as A
from jedi_jax.models.functional import Functional
from jedi_jax.models.unet import UNet, UNetConfig
from jedi_jax.models.unet_blocks import Transformer2DModel

CFG = UNetConfig(in_channels=9, out_channels=4, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                 transformer_layers_per_block=(1, 1), num_heads=(2, 4), cross_attention_dim=(16, 16),
                 norm_num_groups=8)
B, N, HW, T = 2, 3, 8, 5
A.register_kernel("chunked_test_40", A.make_chunked_kernel(40))  # 3 members * 64 tokens: 5 chunks, ragged


@functools.lru_cache(maxsize=None)
def _model(**kwargs):
    """(functional, jitted apply) for UNet(CFG, **kwargs); params are shared across variants."""
    fm = Functional.abstract(lambda r: UNet(CFG, rngs=r, **dict(kwargs)))
    return fm, jax.jit(lambda p, x, t, c, m: fm.bind(p)(x, t, c, m))


def _apply(params, x, t, c, m=None, **kwargs):
    return np.asarray(_model(**kwargs)[1](params, x, t, c, m))


def random_params(factory, seed: int = 0) -> dict:
    """Unit-scale random params from the abstract shapes (numpy: much faster than eager init on CPU).

    Kernels ~ N(0, 1/fan_in); biases ~ N(0, 0.1^2); norm scales ~ 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def init(path, s):
        leaf = path[-1].key
        z = rng.standard_normal(s.shape).astype(np.float32)
        if leaf == "kernel":
            return jnp.asarray(z / np.sqrt(np.prod(s.shape[:-1])))
        return jnp.asarray(0.1 * z + (1.0 if leaf == "scale" else 0.0))

    shapes = Functional.abstract(factory).param_shapes()
    return jax.tree_util.tree_map_with_path(init, shapes)


@pytest.fixture(scope="module")
def params():
    return random_params(lambda r: UNet(CFG, rngs=r))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, N, HW, HW, CFG.in_channels)), jnp.float32)
    t = jnp.asarray([10, 700], jnp.int32)
    c = jnp.asarray(rng.standard_normal((B, N, T, 16)), jnp.float32)
    return x, t, c


def _full_mask():
    return jnp.ones((B, N), bool)


def test_output_shape_scale_and_none_mask(params, inputs):
    x, t, c = inputs
    out = _apply(params, x, t, c, _full_mask())
    assert out.shape == (B, N, HW, HW, CFG.out_channels) and out.dtype == np.float32
    assert 0.1 < out.std() < 10 and np.isfinite(out).all()
    np.testing.assert_array_equal(_apply(params, x, t, c, None), out)  # None: every member is real


def test_timestep_shapes_broadcast_or_fail_naming_the_shape(params, inputs):
    """(), (1,) and (B,) are one time per set, (B, N) one per image; anything else is one clear error."""
    x, _, c = inputs
    per_image = _apply(params, x, jnp.full((B, N), 300, jnp.int32), c)
    for t in (jnp.int32(300), jnp.asarray([300], jnp.int32), jnp.full((B,), 300, jnp.int32)):
        np.testing.assert_allclose(_apply(params, x, t, c), per_image, atol=1e-6, rtol=0)
    mixed = _apply(params, x, jnp.asarray([[300] * N, [900] * N], jnp.int32), c)
    np.testing.assert_allclose(mixed[0], per_image[0], atol=1e-6, rtol=0)
    assert np.abs(mixed[1] - per_image[1]).max() > 1e-3  # the time really reaches the output
    for bad in ((B + 1,), (N, B), (B, N, 1)):
        with pytest.raises(ValueError, match=r"timesteps must be .* got \(" + ", ".join(map(str, bad))):
            _apply(params, x, jnp.zeros(bad, jnp.int32), c)


def test_sets_of_one_are_plain_per_image_unet(params, inputs):
    """N=1 (the folded batch, no coupling) equals running every image alone."""
    x, t, c = inputs
    t_img = jnp.repeat(t, N)  # (B*N,)
    x1 = x.reshape(B * N, 1, *x.shape[2:])  # (B*N, 1, h, w, C): every image its own set
    c1 = c.reshape(B * N, 1, T, 16)
    plain = _apply(params, x1, t_img, c1, None)  # (B*N, 1, h, w, C)
    # every image is computed on its own: replacing all the others changes nothing for it
    for i in (0, 4):
        others = np.arange(B * N) != i
        x_o = jnp.where(others[:, None, None, None, None], -3.0 * x1, x1)
        c_o = jnp.where(others[:, None, None, None], -c1, c1)
        alone = _apply(params, x_o, t_img, c_o, None)
        np.testing.assert_allclose(alone[i], plain[i], atol=1e-5, rtol=0)
        assert np.abs(alone[others] - plain[others]).max() > 1e-2
    # and coupling over N=3 really differs from the uncoupled result
    coupled = _apply(params, x, t, c, _full_mask()).reshape(B * N, 1, HW, HW, -1)
    assert np.abs(coupled - plain).max() > 1e-3


def test_coupling_matters(params, inputs):
    x, t, c = inputs
    out = _apply(params, x, t, c, _full_mask())
    x2 = x.at[0, 2].set(-x[0, 2])  # change member 2 of set 0 only
    out2 = _apply(params, x2, t, c, _full_mask())
    assert np.abs(out2[0, 0] - out[0, 0]).max() > 1e-3  # member 0 sees member 2
    np.testing.assert_allclose(out2[1], out[1], atol=1e-6, rtol=0)  # other sets are independent


def test_permuting_members_permutes_outputs(params, inputs):
    x, t, c = inputs
    mask = jnp.asarray([[True, True, False], [True, False, True]])
    out = _apply(params, x, t, c, mask)
    perm = np.array([2, 0, 1])
    out_p = _apply(params, x[:, perm], t, c[:, perm], mask[:, perm])
    valid = np.asarray(mask)[:, perm]
    np.testing.assert_allclose(out_p[valid], out[:, perm][valid], atol=1e-5, rtol=0)


def test_padded_member_changes_nothing(params, inputs):
    x, t, c = inputs
    mask = jnp.asarray([[True, True, False], [True, False, True]])
    out = _apply(params, x, t, c, mask)
    rng = np.random.default_rng(1)
    pad = ~np.asarray(mask)  # (B, N)
    x_g = jnp.where(pad[:, :, None, None, None], 50 * rng.standard_normal(x.shape), x).astype(jnp.float32)
    c_g = jnp.where(pad[:, :, None, None], 50 * rng.standard_normal(c.shape), c).astype(jnp.float32)
    out_g = _apply(params, x_g, t, c_g, mask)
    valid = np.asarray(mask)
    np.testing.assert_allclose(out_g[valid], out[valid], atol=1e-5, rtol=0)
    # a padded member holding NaN (an undecodable image, say) leaves the valid members untouched
    out_nan = _apply(params, jnp.where(pad[:, :, None, None, None], jnp.nan, x), t, c, mask)
    assert np.isfinite(out_nan[valid]).all()
    np.testing.assert_allclose(out_nan[valid], out[valid], atol=1e-5, rtol=0)
    # padding a set is the same as not having the member at all (and t (B, N) == t (B,) broadcast)
    small = _apply(params, x[:1, :2], jnp.repeat(t[:1, None], 2, axis=1), c[:1, :2], None)
    np.testing.assert_allclose(small[0], out[0, :2], atol=1e-5, rtol=0)


def test_remat_identical(params, inputs):
    x, t, c = inputs
    mask = jnp.asarray([[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(_apply(params, x, t, c, mask, remat=True), _apply(params, x, t, c, mask))


def test_remat_gradients_identical():
    """Gradients through rematerialised transformer blocks (coupled attention inside) equal plain ones."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2 * 3, 4, 4, 16)), jnp.float32)  # (B*N, h, w, C)
    ctx = jnp.asarray(rng.standard_normal((2 * 3, 5, 8)), jnp.float32)  # (B*N, T, D)
    mask = jnp.asarray([[True, False, True], [True, True, True]])  # (B, N)

    def make(remat):
        return lambda r: Transformer2DModel(2, 8, 16, num_layers=2, cross_attention_dim=8, norm_num_groups=4,
                                            remat=remat, rngs=r)

    fm, p = Functional.abstract(make(False)), random_params(make(False), seed=5)
    fm_remat = Functional.abstract(make(True))

    def loss(f):
        return lambda p, x: jnp.mean(jnp.sin(f.bind(p)(x, ctx, num_members=3, member_mask=mask)))

    # remat really is on: the gradient's jaxpr holds jax.checkpoint's primitive, only with remat=True
    def remat_eqns(f):
        def count(jaxpr):
            n = 0
            for eqn in jaxpr.eqns:
                n += eqn.primitive.name.startswith("remat") or eqn.primitive.name == "checkpoint"
                for v in eqn.params.values():  # nested jaxprs (jit, remat, ...)
                    inner = getattr(v, "jaxpr", None)
                    n += count(getattr(inner, "jaxpr", inner)) if inner is not None else 0
            return n
        return count(jax.make_jaxpr(jax.grad(loss(f)))(p, x).jaxpr)

    assert remat_eqns(fm_remat) >= 2 and remat_eqns(fm) == 0  # one per transformer block (layer)
    g = jax.jit(jax.grad(loss(fm_remat), argnums=(0, 1)))(p, x)
    g_ref = jax.jit(jax.grad(loss(fm), argnums=(0, 1)))(p, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_chunked_kernel_equals_xla(params, inputs):
    x, t, c = inputs
    mask = jnp.asarray([[True, False, True], [True, True, True]])
    out = _apply(params, x, t, c, mask, attention_kernel="chunked_test_40")
    np.testing.assert_allclose(out, _apply(params, x, t, c, mask), atol=1e-5, rtol=0)


def test_bf16_compute_close(params, inputs):
    x, t, c = inputs
    mask = _full_mask()
    ref = _apply(params, x, t, c, mask)
    out = _apply(params, x, t, c, mask, dtype=jnp.bfloat16)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"bf16 vs f32: max abs err / max abs = {err:.3e}")
    assert 0 < err < 5e-2  # close, and not equal: bf16 really ran (float32 again would give exactly 0)


def test_input_validation(params, inputs):
    x, t, c = inputs
    fm, _ = _model()
    with pytest.raises(ValueError, match="latents must be"):
        fm.bind(params)(x[0], t, c)
    with pytest.raises(ValueError, match="context must be"):
        fm.bind(params)(x, t, c[:, 0])
    with pytest.raises(ValueError, match=f"latents have 4 channels; this UNet takes in_channels={CFG.in_channels}"):
        fm.bind(params)(x[..., :4], t, c)  # plain SD latents given to a JeDi (2C+1) UNet
    with pytest.raises(ValueError, match="context width 12 does not match the UNet's cross_attention_dim 16"):
        fm.bind(params)(x, t, c[..., :12])
    with pytest.raises(ValueError, match="unknown attention kernel"):
        Functional.abstract(lambda r: UNet(CFG, attention_kernel="nope", rngs=r))


def test_bind_refuses_params_that_do_not_fit(params, inputs):
    """A (1,) bias would broadcast where (C,) is due and give wrong numbers with no error: bind names
    missing, unexpected and mis-shaped parameters instead."""
    import copy

    fm, _ = _model()
    bad = copy.deepcopy(jax.tree.map(np.asarray, params))
    bad["conv_in"]["bias"] = bad["conv_in"]["bias"][:1]  # (1,) instead of (C0,)
    del bad["conv_out"]["bias"]
    bad["extra"] = {"kernel": np.zeros(3)}
    with pytest.raises(ValueError, match=r"missing parameter 'conv_out.bias'.*unexpected parameter 'extra.kernel'.*"
                                         r"'conv_in.bias' has shape \(1,\) but the model needs \(32,\)"):
        fm.bind(bad)
    fm.bind(params)  # the real ones bind
