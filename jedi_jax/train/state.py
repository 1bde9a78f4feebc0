"""Train state, optimizer and sharded initialization (JeDi, Sec. 4: the UNet is fine-tuned from SD).

Only the UNet is trained; the VAE and the text encoder are frozen and enter the train step as
ordinary jit arguments. Parameters are float32 masters (the compute dtype is the model's `dtype`).

Abstract-first init (MaxDiffusion style): `jax.eval_shape` gives the state's shapes without
memory, shardings are derived from the shapes, and `jax.jit(init, out_shardings=...)` creates the
parameters, optimizer moments and EMA already split over the mesh -- no host ever holds the full
state. From a converted SD folder the params are loaded by the lead's `jedi_jax.loading` (already
placed with their shardings when possible) and conv_in is widened 4 -> 9 input channels with zero
weights (`widen_conv_in`), so the initial model computes exactly SD.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from jedi_jax.models.jedi_inputs import widen_conv_in  # noqa: F401  (re-exported: the one definition)
from jedi_jax.train import sharding as shd


@struct.dataclass
class TrainState:
    """A pytree. `ema_params` is None when EMA is off (ema_decay == 0)."""

    step: jax.Array  # () int32, number of train steps (micro-steps with gradient accumulation) taken
    params: Any  # nested dict of float32 arrays (UNet)
    opt_state: Any  # optax state
    ema_params: Any = None  # nested dict like params, or None


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup lr/W, 2 lr/W, ..., lr over the first W = `warmup_steps` updates (the first
    update already moves), then 'cosine' decay whose last update (count total - 1) applies exactly
    lr * end_lr_factor, the peak applied once; or 'constant'.

    Counts OPTIMIZER updates: with gradient accumulation k the horizon is steps // k.
    """
    lr = float(train_cfg.lr)
    accum = max(1, int(train_cfg.grad_accum))
    total = max(1, int(train_cfg.steps) // accum)
    warmup = min(int(train_cfg.warmup_steps), total)
    # after(i) for i = 1, ..., total - W: the update after the warmup's last (which applied lr) is
    # i = 1; without warmup the first update is i = 0 (lr) and the horizon one shorter
    horizon = max(1, total - warmup if warmup else total - 1)
    if train_cfg.decay == "constant":
        after = optax.constant_schedule(lr)
    elif train_cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(lr, horizon, alpha=float(train_cfg.end_lr_factor))
    else:
        raise ValueError(f"train.decay={train_cfg.decay!r}: use 'cosine' or 'constant'")
    if warmup == 0:
        return after

    def schedule(count):
        count = jnp.asarray(count)
        warm = lr * jnp.minimum(1.0, (count + 1) / warmup)
        return jnp.where(count < warmup, warm, after(jnp.maximum(count - warmup + 1, 0)))

    return schedule


def _decay_mask(params):
    """Weight decay on matrices and conv kernels only (not norms, biases)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> AdamW(schedule), optionally wrapped in optax.MultiSteps (grad accumulation)."""
    schedule = learning_rate_schedule(train_cfg)
    parts = []
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps),
                             weight_decay=float(train_cfg.weight_decay), mask=_decay_mask))
    tx = optax.chain(*parts)
    if int(train_cfg.grad_accum) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(train_cfg.grad_accum))
    return tx, schedule


def optimizer_updates(tx: optax.GradientTransformation, opt_state, step) -> jax.Array:
    """Number of optimizer updates applied so far (for the lr metric)."""
    if isinstance(tx, optax.MultiSteps):
        return opt_state.gradient_step
    return step


def did_update(tx: optax.GradientTransformation, opt_state) -> jax.Array:
    """True when the last `tx.update` changed the params (always, without accumulation)."""
    if isinstance(tx, optax.MultiSteps):
        return tx.has_updated(opt_state)
    return jnp.asarray(True)


# ----------------------------------------------------------------------------- state construction


def create_state(params, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )


def state_shardings_for(abstract: TrainState, tx: optax.GradientTransformation, mesh: Mesh, rules) -> TrainState:
    """Shardings of every leaf of the state: params/EMA by the rules; optimizer moments (and the
    MultiSteps accumulator) like their params; counters and other non-param leaves replicated."""
    p_shard = shd.param_shardings(abstract.params, mesh, rules)
    rep = shd.replicated(mesh)
    opt_shard = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, p_shard,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard,
                      ema_params=None if abstract.ema_params is None else p_shard)


def nnx_init_fn(factory: Callable[[nnx.Rngs], nnx.Module]) -> Callable[[jax.Array], Any]:
    """key -> params dict for an NNX module factory (traceable: use inside jit / eval_shape)."""
    def init(key):
        module = factory(nnx.Rngs(params=key))
        return nnx.split(module)[1].to_pure_dict()
    return init


def ema_update(ema_params, params, decay: float, apply: jax.Array):
    """ema <- decay * ema + (1 - decay) * params, only where `apply` (a traced bool) is True."""
    d = jnp.where(apply, jnp.float32(decay), jnp.float32(1.0))
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)
