"""Train-step pieces, in process and fast: the JeDi loss masking (Sec. 3: loss on generated members
only), targets, optimizer schedule, gradient accumulation + EMA, and conv_in widening from a
converted SD-layout folder (a converted 4-channel model starts as exactly that model)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jedi_jax.schedulers.schedule import NoiseScheduleConfig, add_noise, make_schedule, v_target
from jedi_jax.train import state as state_lib
from jedi_jax.train import step as step_lib

B, N, H, C = 2, 4, 4, 4
FROZEN = {"vae": {}, "text_encoder": {}}


@dataclasses.dataclass(frozen=True)
class EchoModels:
    """Stand-in networks: the 'UNet' returns params['pred'] (so d loss / d pred is observable) and
    records nothing else; text and VAE are fixed functions."""

    def encode_images(self, vae_params, images, key):
        return images[..., :1].repeat(C, -1) * 0.5

    def encode_text(self, text_params, ids):
        return jnp.ones(ids.shape + (3,), jnp.float32)

    def unet_apply(self, params, latents, t, ctx, member_mask):
        assert latents.shape == (B, N, H, H, 2 * C + 1) and ctx.shape == (B, N, 5, 3) and t.shape == (B,)
        return params["pred"] + 0.0 * latents[..., :C]


def _batch():
    rng = np.random.default_rng(0)
    member = np.array([[True, True, True, False], [True, True, True, True]])
    ref = np.array([[True, False, False, False], [False, True, True, False]])
    return {"latents": jnp.asarray(rng.normal(size=(B, N, H, H, C)), jnp.float32),
            "input_ids": jnp.zeros((B, N, 5), jnp.int32), "member_mask": jnp.asarray(member),
            "ref_mask": jnp.asarray(ref)}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_only_on_generated_members(prediction_type):
    schedule = make_schedule(NoiseScheduleConfig())
    batch = _batch()
    key = jax.random.key(3)
    pred = jnp.asarray(np.random.default_rng(1).normal(size=(B, N, H, H, C)), jnp.float32)

    def loss(p):
        return step_lib.jedi_loss(EchoModels(), schedule, prediction_type, {"pred": p}, FROZEN, batch, key)[0]

    value, grad = jax.value_and_grad(loss)(pred)
    gen = np.asarray(batch["member_mask"] & ~batch["ref_mask"])  # (B, N)
    g = np.abs(np.asarray(grad)).sum(axis=(2, 3, 4))
    assert (g[~gen] == 0).all(), "references / padding must get no gradient"
    assert (g[gen] > 0).all()
    # Reproduce the target with the step's own key split: one t per SET.
    k_t, k_noise, _ = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (B,), 0, 1000)
    noise = jax.random.normal(k_noise, batch["latents"].shape)
    target = noise if prediction_type == "epsilon" else v_target(schedule, batch["latents"], noise, t)
    per = np.mean((np.asarray(pred) - np.asarray(target)) ** 2, axis=(2, 3, 4))
    np.testing.assert_allclose(float(value), per[gen].mean(), rtol=1e-6)
    _, aux = step_lib.jedi_loss(EchoModels(), schedule, prediction_type, {"pred": pred}, FROZEN, batch, key)
    assert int(aux["generated"]) == gen.sum() and int(aux["references"]) == 3


def test_set_loss_weighting_weighs_every_set_the_same():
    """loss_weighting="set": a set with 4 generated members and one with 1 count the same; a set of
    references only carries no loss (and no NaN). "member" weighs the 5 generated images the same."""
    schedule = make_schedule(NoiseScheduleConfig())
    key = jax.random.key(5)
    pred = jnp.asarray(np.random.default_rng(2).normal(size=(B, N, H, H, C)), jnp.float32)
    batch = dict(_batch(), member_mask=jnp.ones((B, N), bool),
                 ref_mask=jnp.asarray([[False] * 4, [True, True, True, False]]))
    k_t, k_noise, _ = jax.random.split(key, 3)
    noise = np.asarray(jax.random.normal(k_noise, batch["latents"].shape))
    per = np.mean((np.asarray(pred) - noise) ** 2, axis=(2, 3, 4))  # (B, N), epsilon target

    def loss(weighting, b=batch):
        return step_lib.jedi_loss(EchoModels(), schedule, "epsilon", {"pred": pred}, FROZEN, b, key, weighting)

    (member, aux_m), (per_set, aux_s) = loss("member"), loss("set")
    np.testing.assert_allclose(float(member), (per[0].sum() + per[1, 3]) / 5, rtol=1e-6)
    np.testing.assert_allclose(float(per_set), (per[0].mean() + per[1, 3]) / 2, rtol=1e-6)
    assert abs(float(member) - float(per_set)) > 1e-3
    assert int(aux_m["generated"]) == int(aux_s["generated"]) == 5
    refs_only = dict(batch, ref_mask=jnp.asarray([[False] * 4, [True] * 4]))
    np.testing.assert_allclose(float(loss("set", refs_only)[0]), per[0].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_weighting"):
        loss("image")


def test_subject_weight_is_a_weighted_mean_over_the_latent_grid():
    """train.subject_weight=a: within each member the squared error is averaged over latent cells with
    weight 1 + a * (subject fraction of the cell), masks pooled from image resolution (2x here); so
    the gradient at a subject cell is 1 + a times that at a background cell with the same error, the
    loss keeps the plain loss's scale (all-background masks give exactly the plain loss), and a
    batch without masks is an error, not a silent plain loss."""
    schedule = make_schedule(NoiseScheduleConfig())
    key = jax.random.key(7)
    a = 3.0
    pred = jnp.asarray(np.random.default_rng(4).normal(size=(B, N, H, H, C)), jnp.float32)
    masks = np.zeros((B, N, 2 * H, 2 * H), np.float32)  # image resolution: 2x the latent grid
    masks[:, :, :4, :4] = 1.0  # subject = latent cells [0:2, 0:2] in full
    masks[:, :, 4, 4] = 1.0  # and a quarter of latent cell (2, 2)
    batch = dict(_batch(), masks=jnp.asarray(masks))
    cell = np.asarray(step_lib.subject_weight_map(batch["masks"], a, (H, H)))  # (B, N, H, H)
    want_cell = np.ones((H, H), np.float32)
    want_cell[:2, :2], want_cell[2, 2] = 1 + a, 1 + a / 4
    np.testing.assert_allclose(cell, np.broadcast_to(want_cell, cell.shape), rtol=1e-6)

    def loss(p, b=batch, w=a):
        return step_lib.jedi_loss(EchoModels(), schedule, "epsilon", {"pred": p}, FROZEN, b, key, "member", w)[0]

    k_t, k_noise, _ = jax.random.split(key, 3)
    noise = np.asarray(jax.random.normal(k_noise, pred.shape))
    sq = np.mean((np.asarray(pred) - noise) ** 2, axis=-1)  # (B, N, H, H)
    per = (sq * want_cell).sum(axis=(2, 3)) / want_cell.sum()  # (B, N)
    gen = np.asarray(batch["member_mask"] & ~batch["ref_mask"])
    value, grad = jax.value_and_grad(loss)(pred)
    np.testing.assert_allclose(float(value), per[gen].mean(), rtol=1e-5)
    plain = float(loss(pred, w=0.0))
    np.testing.assert_allclose(plain, sq.mean(axis=(2, 3))[gen].mean(), rtol=1e-5)
    assert abs(float(value) - plain) > 1e-3
    # d loss / d pred = weight * 2 (pred - noise) / (C * sum weight * #generated): the ratio of subject to background
    ratio = np.asarray(grad) / (np.asarray(pred) - noise)  # (B, N, H, H, C)
    b0, n0 = np.argwhere(gen)[0]
    np.testing.assert_allclose(ratio[b0, n0, 0, 0] / ratio[b0, n0, 3, 3], 1 + a, rtol=1e-4)
    np.testing.assert_allclose(ratio[b0, n0, 2, 2] / ratio[b0, n0, 3, 3], 1 + a / 4, rtol=1e-4)
    background = dict(batch, masks=jnp.zeros_like(batch["masks"]))
    np.testing.assert_allclose(float(loss(pred, background)), plain, rtol=1e-6)
    no_masks = {k: v for k, v in batch.items() if k != "masks"}
    with pytest.raises(KeyError, match="subject masks"):
        loss(pred, no_masks)
    with pytest.raises(ValueError, match="do not pool"):
        step_lib.subject_weight_map(jnp.zeros((B, N, 9, 9)), a, (H, H))


def test_subject_weight_by_timestep_uses_each_sets_own_timestep():
    """train.subject_weight_high_noise=b: a set drawn at t < high_noise_from_t weighs its subject a, one
    at t >= it weighs it b (experiment 23's split); the loss equals the constant-weight loss computed
    per set at its own weight, a constant table equals the float weight, and the config turns into
    the table only when b >= 0 (old configs read as constant)."""
    schedule = make_schedule(NoiseScheduleConfig())
    T = schedule.num_train_timesteps
    key = jax.random.key(11)
    k_t, _, _ = jax.random.split(key, 3)
    t = np.asarray(jax.random.randint(k_t, (B,), 0, T))  # the timesteps the loss will draw
    t0 = int(t.min()) + 1  # set argmin(t) is low-noise, the other high-noise
    assert t.max() >= t0
    a, b = 6.0, 1.0
    masks = np.zeros((B, N, H, H), np.float32)
    masks[:, :, :2, :2] = 1.0
    batch = dict(_batch(), masks=jnp.asarray(masks))
    pred = jnp.asarray(np.random.default_rng(5).normal(size=(B, N, H, H, C)), jnp.float32)

    def loss(w, weighting="set"):
        return float(step_lib.jedi_loss(EchoModels(), schedule, "epsilon", {"pred": pred}, FROZEN, batch, key,
                                        weighting, w)[0])

    c = ml_collections.ConfigDict({"train": {"subject_weight": a, "subject_weight_high_noise": -1.0,
                                             "high_noise_from_t": t0}})
    assert step_lib.configured_subject_weight_by_t(c, T) == a
    c.train.subject_weight_high_noise = b
    table = step_lib.configured_subject_weight_by_t(c, T)
    assert table.shape == (T,) and table[t0 - 1] == a and table[t0] == b
    assert step_lib.configured_uses_subject_weight(c)
    np.testing.assert_allclose(loss(np.full(T, a, np.float32)), loss(a), rtol=1e-6)
    # "set" weighting averages each set's own loss; with the other set's members masked out, the loss is
    # set i's term alone (same key: same t and noise), here computed at the constant weight a(t_i)
    want = []
    for i in range(B):
        only_i = dict(batch, member_mask=batch["member_mask"].at[1 - i].set(False))
        w = a if t[i] < t0 else b
        want.append(float(step_lib.jedi_loss(EchoModels(), schedule, "epsilon", {"pred": pred}, FROZEN, only_i,
                                             key, "set", w)[0]))
    np.testing.assert_allclose(loss(table), np.mean(want), rtol=1e-5)
    assert abs(loss(table) - loss(a)) > 1e-4  # the high-noise set's weight did change the loss
    none = ml_collections.ConfigDict({"train": {"subject_weight": 0.0, "subject_weight_high_noise": 0.0}})
    assert not step_lib.configured_uses_subject_weight(none)


def test_unet_input_carries_references_clean_and_noisy_channel_for_all():
    schedule = make_schedule(NoiseScheduleConfig())
    batch = _batch()
    seen = {}

    @dataclasses.dataclass(frozen=True)
    class Spy(EchoModels):
        def unet_apply(self, params, latents, t, ctx, member_mask):
            seen["x"], seen["t"] = latents, t
            return params["pred"]

    key = jax.random.key(0)
    step_lib.jedi_loss(Spy(), schedule, "epsilon", {"pred": jnp.zeros((B, N, H, H, C))}, FROZEN, batch, key)
    x, x0 = np.asarray(seen["x"]), np.asarray(batch["latents"])
    ref = np.asarray(batch["ref_mask"] & batch["member_mask"])
    k_t, k_noise, _ = jax.random.split(key, 3)
    noisy = add_noise(schedule, batch["latents"], jax.random.normal(k_noise, x0.shape), seen["t"])
    np.testing.assert_allclose(x[..., :C], np.asarray(noisy), atol=1e-6)  # x_t for every member
    np.testing.assert_array_equal(x[..., C], np.broadcast_to(ref[:, :, None, None], x.shape[:4]).astype(np.float32))
    np.testing.assert_array_equal(x[..., C + 1:][ref], x0[ref])  # clean reference latents
    assert (x[..., C + 1:][~ref] == 0).all()


def _train_cfg(**kw):
    base = dict(lr=1e-2, grad_accum=1, steps=100, warmup_steps=10, decay="cosine", end_lr_factor=0.1,
                grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    return ml_collections.ConfigDict({**base, **kw})


def test_lr_schedule_warmup_then_cosine_or_constant():
    sched = state_lib.learning_rate_schedule(_train_cfg())  # updates 0..99
    applied = np.array([float(sched(s)) for s in range(100)])
    np.testing.assert_allclose(applied[[0, 4, 9]], [1e-3, 5e-3, 1e-2], rtol=1e-6)
    assert (applied == applied.max()).sum() == 1 and applied[9] == applied.max()  # the peak once
    assert (np.diff(applied[9:]) < 0).all()  # then strictly down ...
    np.testing.assert_allclose(applied[99], 1e-3, rtol=1e-5)  # ... to lr * end_lr_factor at the LAST update
    no_warmup = state_lib.learning_rate_schedule(_train_cfg(warmup_steps=0))
    np.testing.assert_allclose([float(no_warmup(0)), float(no_warmup(99))], [1e-2, 1e-3], rtol=1e-5)
    const = state_lib.learning_rate_schedule(_train_cfg(decay="constant"))
    assert float(const(50)) == pytest.approx(1e-2)
    accum = state_lib.learning_rate_schedule(_train_cfg(grad_accum=4))  # horizon in optimizer updates: 25
    np.testing.assert_allclose(float(accum(24)), 1e-3, rtol=1e-5)


def test_grad_accumulation_and_ema_update_only_on_optimizer_steps():
    cfg = _train_cfg(grad_accum=2, warmup_steps=0, decay="constant")
    tx, sched = state_lib.make_optimizer(cfg)
    schedule = make_schedule(NoiseScheduleConfig())
    step_fn = jax.jit(step_lib.make_train_step(EchoModels(), schedule, tx, sched, prediction_type="epsilon",
                                               ema_decay=0.5))
    params = {"pred": jnp.zeros((B, N, H, H, C))}
    state = state_lib.create_state(params, tx, ema=True)
    key = jax.random.key_data(jax.random.key(0))
    history = []
    for _ in range(4):
        state, metrics = step_fn(state, _batch(), FROZEN, key)
        history.append((np.asarray(state.params["pred"]).copy(), np.asarray(state.ema_params["pred"]).copy()))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["lr"]) == pytest.approx(1e-2)
    assert int(state.step) == 4
    (p1, e1), (p2, e2), (p3, e3), (p4, e4) = history
    assert (p1 == 0).all() and (e1 == 0).all()  # first micro-step: accumulate only
    assert np.abs(p2).max() > 0 and np.allclose(e2, 0.5 * p2)  # update + EMA
    np.testing.assert_array_equal(p3, p2)
    np.testing.assert_array_equal(e3, e2)  # no EMA drift between updates
    np.testing.assert_allclose(e4, 0.5 * e2 + 0.5 * p4, rtol=1e-6)
    # The update used the MEAN of the two micro-gradients (not their sum, nor the last alone): Adam's
    # first moment after one update is (1 - b1) * clip(mean(g1, g2)). The micro-steps differ in their
    # timestep and noise (keys fold in the step), so g1 != g2 and the three readings disagree.
    zero = {"pred": jnp.zeros((B, N, H, H, C))}

    def grad_at(step):
        k = jax.random.fold_in(jax.random.wrap_key_data(key), step)
        return jax.grad(lambda p: step_lib.jedi_loss(EchoModels(), schedule, "epsilon", p, FROZEN, _batch(), k)[0])(
            zero)["pred"]

    g1, g2 = np.asarray(grad_at(0)), np.asarray(grad_at(1))
    assert np.abs(g1 - g2).max() > 1e-3
    assert np.linalg.norm(g1 + g2) < cfg.grad_clip  # the clip does not bite: mu is linear in what is accumulated
    clipped = optax.clip_by_global_norm(cfg.grad_clip).update({"pred": (g1 + g2) / 2}, None)[0]["pred"]
    fresh = state_lib.create_state(zero, tx, ema=True)
    for i in range(2):
        fresh, _ = step_fn(fresh, _batch(), FROZEN, key)
    mu = fresh.opt_state.inner_opt_state[-1][0].mu["pred"]  # MultiSteps(chain(clip, adamw)): adam's state
    np.testing.assert_allclose(np.asarray(mu), (1 - cfg.b1) * np.asarray(clipped), rtol=1e-5, atol=1e-9)


def _write_t2i_folder(dst):
    """A converted random-weight text-to-image (4-channel UNet) SD-layout folder. Weights are numpy
    normals of the right shapes (no XLA compile: initializers do not matter here)."""
    from jedi_jax.convert import components as comp
    from jedi_jax.convert.pipeline_folder import write_model_folder
    from jedi_jax.models.clip_text import CLIPTextConfig
    from jedi_jax.models.tiny import TINY_WORDS
    from jedi_jax.models.tokenizer import write_test_tokenizer
    from jedi_jax.models.unet import UNetConfig
    from jedi_jax.models.vae import VAEConfig

    configs = {  # the :micro networks, with SD's 4-channel text-to-image UNet input
        "unet": UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16,),
                           down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                           layers_per_block=(1,), transformer_layers_per_block=(1,), num_heads=(2,),
                           cross_attention_dim=(16,), norm_num_groups=8),
        "vae": VAEConfig(block_out_channels=(8,), norm_num_groups=4),
        "text_encoder": CLIPTextConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=8),
    }
    kinds = {"unet": "unet", "vae": "vae", "text_encoder": "clip_text"}
    from jedi_jax.models.functional import Functional

    rng = np.random.default_rng(0)
    parts = {}
    for name, cfg in configs.items():
        shapes = Functional.abstract(comp.model_factory(kinds[name], cfg)).param_shapes()
        params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
        parts[name] = (kinds[name], cfg, params)
    write_test_tokenizer(dst.parent / "tok", TINY_WORDS)
    return write_model_folder(dst, parts, extra_folders={"tokenizer": dst.parent / "tok"})


def test_widen_conv_in_from_converted_4_channel_folder(tmp_path):
    """A converted text-to-image (4-channel) SD-layout folder becomes a 9-channel JeDi UNet whose
    output ignores the new channels at init: it computes what the source model computed."""
    from configs import sd15
    from jedi_jax.loading import load_component
    from jedi_jax.train import models as models_lib
    from jedi_jax.train import sharding as shd

    folder = _write_t2i_folder(tmp_path / "t2i")
    cfg = sd15.get_config("micro")
    cfg.model.pretrained = str(folder)
    mesh = shd.make_mesh(("data", "fsdp"), (1, 1), devices=jax.devices()[:1])
    bundle = models_lib.build(cfg.model, mesh=mesh, rules=shd.DEFAULT_RULES, seed=0)
    assert bundle.unet_init is None and bundle.models.unet_config.in_channels == 9
    src = load_component(folder, "unet")
    k_new, k_old = bundle.unet_params["conv_in"]["kernel"], src.params["conv_in"]["kernel"]
    assert k_new.shape == (3, 3, 9, 16) and k_old.shape == (3, 3, 4, 16)
    np.testing.assert_array_equal(np.asarray(k_new[:, :, :4]), np.asarray(k_old))
    assert (np.asarray(k_new[:, :, 4:]) == 0).all()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 8, 8, 4)).astype(np.float32)
    extra = rng.normal(size=(1, 2, 8, 8, 5)).astype(np.float32)  # mask + reference channels: ignored
    ctx = rng.normal(size=(1, 2, 8, 16)).astype(np.float32)
    t = np.array([500])
    ours = jax.jit(bundle.models.unet_apply)(bundle.unet_params, np.concatenate([x, extra], -1), t, ctx, None)
    ref = jax.jit(lambda p, *a: src.functional.bind(p)(*a))(src.params, x, t, ctx, None)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
