r"""JeDi-mini part 1: train a small KL autoencoder (our diffusers-equivalent `AutoencoderKL`) on the
procedural mini world.

    python -m jedi_jax.train.vae_trainer --config configs/mini_vae.py:gpu --workdir runs/mini_vae_gpu
    python -m jedi_jax.train.vae_trainer --config configs/mini_vae.py:cpu --workdir runs/mini_vae_cpu \
        --config.train.steps=200          # any key can be overridden; unknown keys are errors

What it does (see configs/mini_vae.py for the keys):

* Data: a pool of `data.pool_size` train-split renders (`mini_world.make_set("train", i, n)`)
  built at start (multiprocessing, deterministic), uploaded once as uint8; every step draws its
  batch INSIDE the jitted step from `fold_in(key, step)` (indices + flips), so a resumed run sees
  exactly the batches an uninterrupted one would. Test-split renders (`make_set("test", ...)`)
  are used only for evaluation.
* Loss (SD's first-stage recipe without LPIPS/GAN): reconstruction of a posterior SAMPLE,
  `l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2` (images in [-1, 1]) plus
  `kl_weight * KL / (H*W*3)` where KL is summed over latent elements per image -- i.e. SD's
  `kl_weight` convention (SD: 1e-6 against a per-image SUM of L1).
* AdamW (warmup + cosine), global-norm clipping, optional EMA; bf16 compute by `model.dtype`.
* Progress line every `train.log_every` steps (step, loss, train PSNR, steps/s, ETA) and
  WORKDIR/metrics.jsonl (one JSON object per log / eval).
* Orbax checkpoints of {step, params, opt_state, ema} every `checkpoint.every` steps in
  WORKDIR/checkpoints/; a re-run resumes from the latest (finished runs only re-export), refusing
  config changes that would change the trajectory (WORKDIR/config.json is the run's; see
  OPERATIONAL_KEYS; --allow_config_change overrides). SIGTERM, SIGHUP or a first Ctrl-C saves the
  step reached and stops without exporting (a second Ctrl-C aborts). One run per workdir
  (WORKDIR/.lock, checkpoint.WorkdirLock); a start that fails removes the folders it created.
* At the end: the latent scaling factor 1/std(latents) over `data.scale_renders` train renders
  (posterior samples, as LDM's `scale_by_std`), stored in `VAEConfig.scaling_factor`; test PSNR
  (mean of per-image PSNR over `data.eval_renders` test renders, posterior mean, [0, 1] scale);
  WORKDIR/vae_export/ = a jedi_jax model folder with the `vae` component (jedi_model.json,
  vae/config.json, vae/params); WORKDIR/reconstructions.png; WORKDIR/summary.json.

Load the export:  `load_component_params("WORKDIR/vae_export", "vae", "vae")` (convert.pipeline_folder).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jedi_jax.data import mini_world
from jedi_jax.models.functional import Functional, count_params
from jedi_jax.models.vae import AutoencoderKL, VAEConfig, kl_divergence, sample_latent
from jedi_jax.train.checkpoint import PreemptionGuard, WorkdirLock

log = logging.getLogger("jedi_jax.train.vae")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- model


def vae_config_from(model_cfg, *, scaling_factor: float = 1.0) -> VAEConfig:
    n = len(model_cfg.block_out_channels)
    return VAEConfig(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(int(c) for c in model_cfg.block_out_channels),
        layers_per_block=int(model_cfg.layers_per_block),
        latent_channels=int(model_cfg.latent_channels),
        norm_num_groups=int(model_cfg.norm_num_groups),
        mid_block_add_attention=bool(model_cfg.mid_block_add_attention),
        sample_size=mini_world.RES,
        scaling_factor=float(scaling_factor),
    )


def dtype_of(name: str):
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def vae_factory(vae_config: VAEConfig, dtype=jnp.float32):
    return lambda rngs: AutoencoderKL(vae_config, dtype=dtype, rngs=rngs)


# ----------------------------------------------------------------------------- data


def _render_chunk(args: tuple[str, int, int, int]) -> np.ndarray:
    split, start, count, n = args
    return np.concatenate([mini_world.make_set(split, i, n=n)["images"] for i in range(start, start + count)])


def make_renders(split: str, num: int, *, set_size: int = 8, workers: int = 0, first_set: int = 0) -> np.ndarray:
    """uint8 (num, 64, 64, 3): renders of sets first_set, first_set+1, ... of `split` (set_size each),
    deterministic (independent of `workers`). workers > 1 uses a spawn-context process pool."""
    num_sets = -(-num // set_size)
    per = max(1, min(64, -(-num_sets // max(1, 4 * workers))))
    jobs = [(split, first_set + s, min(per, num_sets - s), set_size) for s in range(0, num_sets, per)]
    if workers and workers > 1 and len(jobs) > 1:
        from jedi_jax.data.pool import spawn_pool

        with spawn_pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs, chunksize=1)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate(parts)[:num]


def to_float(images_u8: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_u8.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def sample_batch(pool: jax.Array, key: jax.Array, batch_size: int, hflip: float) -> jax.Array:
    """A float [-1, 1] batch drawn (with replacement) from the uint8 pool, random horizontal flips."""
    k_idx, k_flip = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, pool.shape[0])
    x = to_float(pool[idx])
    if hflip > 0:
        flip = jax.random.bernoulli(k_flip, hflip, (batch_size, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
    return x


# ----------------------------------------------------------------------------- loss / step


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR (dB) of [-1, 1] images on the [0, 1] scale, y clipped; (B,)."""
    err = (jnp.clip(y.astype(jnp.float32), -1, 1) - x.astype(jnp.float32)) * 0.5
    mse = jnp.mean(jnp.square(err), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def vae_loss(vae: Functional, params, x: jax.Array, key: jax.Array, train_cfg) -> tuple[jax.Array, dict]:
    """(loss, metrics) for a float [-1, 1] batch x (B, H, W, 3)."""
    model = vae.bind(params)
    mean, logvar = model.encode(x)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = sample_latent(mean, logvar, key)
    y = model.decode(z).astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(y - x))
    l2 = jnp.mean(jnp.square(y - x))
    kl = jnp.mean(kl_divergence(mean, logvar))  # per image, summed over latent elements
    loss = train_cfg.l1_weight * l1 + train_cfg.l2_weight * l2 + train_cfg.kl_weight * kl / (x[0].size)
    metrics = dict(loss=loss, l1=l1, l2=l2, kl=kl, psnr=jnp.mean(psnr(x, y)), latent_std=jnp.std(z))
    return loss, metrics


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    lr, total = float(train_cfg.lr), max(1, int(train_cfg.steps))
    warmup = min(int(train_cfg.warmup_steps), total)
    if train_cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(lr, max(1, total - warmup), alpha=float(train_cfg.end_lr_factor))
    elif train_cfg.decay == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"train.decay={train_cfg.decay!r}: use 'cosine' or 'constant'")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(train_cfg)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731  (kernels only)
    parts = [optax.clip_by_global_norm(float(train_cfg.grad_clip))] if train_cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                             weight_decay=float(train_cfg.weight_decay), mask=decay_mask))
    return optax.chain(*parts), schedule


def init_state(vae: Functional, params, tx: optax.GradientTransformation, ema: bool) -> dict:
    """{step, params, opt_state[, ema]} (a plain dict pytree; 'ema' only when EMA is on)."""
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def make_train_step(vae: Functional, tx: optax.GradientTransformation, config):
    """step_fn(state, pool, base_key) -> (state, metrics); jit it (params are arguments)."""
    train_cfg, data_cfg = config.train, config.data
    ema_decay = float(train_cfg.ema_decay)
    batch_size, hflip = int(data_cfg.batch_size), float(data_cfg.hflip)

    def step_fn(state, pool, base_key):
        key = jax.random.fold_in(base_key, state["step"])
        k_data, k_z = jax.random.split(key)
        x = sample_batch(pool, k_data, batch_size, hflip)
        grad_fn = jax.value_and_grad(lambda p: vae_loss(vae, p, x, k_z, train_cfg), has_aux=True)
        (_, metrics), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = dict(step=state["step"] + 1, params=params, opt_state=opt_state)
        if "ema" in state:
            t = state["step"].astype(jnp.float32)
            d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            new["ema"] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
        return new, metrics

    return step_fn


# ----------------------------------------------------------------------------- evaluation


def make_reconstruct(vae: Functional):
    """jit: (params, uint8 images) -> float [-1, 1] reconstructions through the posterior mean."""
    @jax.jit
    def reconstruct(params, images_u8):
        return vae.bind(params)(to_float(images_u8)).astype(jnp.float32)

    return reconstruct


def reconstruct_all(reconstruct, params, images_u8: np.ndarray, batch: int) -> np.ndarray:
    """Float [-1, 1] reconstructions of all images (last batch padded to keep one compiled shape)."""
    out = []
    for s in range(0, len(images_u8), batch):
        chunk = images_u8[s:s + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(reconstruct(params, chunk))[:batch - pad])
    return np.concatenate(out)


def evaluate_psnr(reconstruct, params, images_u8: np.ndarray, batch: int) -> float:
    """Mean over images of the per-image PSNR (dB, [0, 1] scale) of posterior-mean reconstructions."""
    recon = reconstruct_all(reconstruct, params, images_u8, batch)
    x = np.asarray(images_u8, np.float32) / 127.5 - 1.0
    return float(np.mean(np.asarray(psnr(jnp.asarray(x), jnp.asarray(recon)))))


def latent_scaling_factor(vae: Functional, params, images_u8: np.ndarray, *, key: jax.Array, batch: int) -> float:
    """1 / std of posterior-sample latents of `images_u8` (LDM's `scale_by_std`: 1/z.flatten().std())."""
    @jax.jit
    def encode(p, x_u8, k):
        mean, logvar = vae.bind(p).encode(to_float(x_u8))
        return sample_latent(mean.astype(jnp.float32), logvar.astype(jnp.float32), k)

    zs = []
    for i, s in enumerate(range(0, len(images_u8), batch)):
        zs.append(np.asarray(encode(params, images_u8[s:s + batch], jax.random.fold_in(key, i)), np.float64))
    return float(1.0 / np.concatenate([z.ravel() for z in zs]).std())


def save_reconstruction_png(path: Path, originals_u8: np.ndarray, recon: np.ndarray, zoom: int = 3) -> Path:
    """Two rows (originals above reconstructions), 2 px white gutters, nearest-neighbour zoom."""
    from PIL import Image

    rec_u8 = np.clip((recon + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    n, h, w, _ = originals_u8.shape
    pad = 2
    grid = np.full((2 * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate((originals_u8, rec_u8)):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = row[c]
    img = Image.fromarray(grid)
    img.resize((img.width * zoom, img.height * zoom), Image.NEAREST).save(path)
    return path


# ----------------------------------------------------------------------------- export


def export_vae(dst: str | Path, vae_config: VAEConfig, params, *, overwrite: bool = True) -> Path:
    """Writes a jedi_jax model folder holding only the `vae` component (jedi_model.json, vae/config.json,
    vae/params), for the lead to assemble the full JeDi-mini folder from."""
    from jedi_jax.convert.pipeline_folder import write_model_folder

    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return write_model_folder(dst, {"vae": ("vae", vae_config, params)}, overwrite=overwrite,
                              source="jedi_jax.train.vae_trainer (mini world)")


# ----------------------------------------------------------------------------- the loop


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(step_key, scale_key): train step t uses fold_in(step_key, t); the scaling-factor latents use
    fold_in(scale_key, i) for their i-th batch."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return k1, k2


def validate_config(config) -> None:
    t, d, m = config.train, config.data, config.model
    errors = []
    if t.steps < 1 or t.log_every < 1 or config.checkpoint.every < 1:
        errors.append("train.steps, train.log_every and checkpoint.every must be >= 1")
    if t.decay not in ("cosine", "constant"):
        errors.append(f"train.decay={t.decay!r} must be 'cosine' or 'constant'")
    if not 0.0 <= t.ema_decay < 1.0:
        errors.append(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if m.dtype not in _DTYPES:
        errors.append(f"model.dtype={m.dtype!r} must be one of {sorted(_DTYPES)}")
    if any(c % m.norm_num_groups for c in m.block_out_channels):
        errors.append(f"model.block_out_channels={tuple(m.block_out_channels)} must be multiples of "
                      f"norm_num_groups={m.norm_num_groups}")
    if d.pool_size < 1 or d.batch_size < 1 or d.set_size < 1 or d.eval_batch < 1:
        errors.append("data.pool_size, batch_size, set_size and eval_batch must be >= 1")
    if not 0.0 <= d.hflip <= 1.0:
        errors.append(f"data.hflip={d.hflip} must be in [0, 1]")
    if errors:
        from jedi_jax.train.trainer import ConfigError

        raise ConfigError("invalid config: " + "; ".join(errors))


def _checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options)


# Keys a resumed run may change: they say how it is logged, evaluated, checkpointed or exported, not
# which batches or updates it makes (the final test PSNR and scaling factor are computed afresh).
OPERATIONAL_KEYS = ("checkpoint.", "export.", "train.log_every", "data.pool_workers", "data.eval_every",
                    "data.eval_quick", "data.eval_batch", "data.eval_renders", "data.scale_renders")


def check_resume_config(workdir: Path, config, latest: int | None, *, allow: bool) -> None:
    """WORKDIR/config.json holds the config the run started with; a resume that changes a key outside
    OPERATIONAL_KEYS (train.steps too, unless the lr schedule does not depend on it) would continue
    another trajectory: trainer.check_config_changes' ConfigChangeError naming the keys, unless `allow`."""
    from jedi_jax.train.checkpoint import config_to_json
    from jedi_jax.train.trainer import check_config_changes, default_config

    current, path = config_to_json(config), workdir / "config.json"
    if latest is not None and path.exists():
        changed = check_config_changes(json.loads(path.read_text()), current, latest, allow=allow,
                                       defaults=default_config("configs.mini_vae"),
                                       operational=OPERATIONAL_KEYS, lr_schedule=learning_rate_schedule)
        if not changed:
            return
    tmp = path.with_suffix(".json.tmp")  # a new run, or one continuing with changes: its config from here on
    tmp.write_text(json.dumps(current, indent=2))
    tmp.replace(path)


def train(config, workdir: str | Path, *, log_fn=None, allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the mini-world VAE in `workdir`, then evaluates and exports it.

    Returns the summary (as written to WORKDIR/summary.json: step, test_psnr, scaling_factor,
    steps_per_s, train_s, export_dir, png, ...) with `params` (the exported float32 params) and
    `vae_config` (the exported VAEConfig) added; after a SIGTERM or SIGHUP, the step reached is
    saved and it returns {"status": "preempted", "step": ...} without exporting (re-run to go on).
    A second run in the same workdir raises checkpoint.WorkdirError at once (WorkdirLock).
    """
    if hasattr(config, "lock"):
        config.lock()
    validate_config(config)
    with WorkdirLock(workdir) as lock:  # held for the whole run
        try:
            return _train(config, lock, log_fn or log.info, allow_config_change)
        except BaseException:
            lock.discard_new()  # a failed start leaves no folders behind (no-op once training began)
            raise


def _train(config, lock: WorkdirLock, say, allow_config_change: bool) -> dict[str, Any]:
    workdir = lock.path
    m, d, t = config.model, config.data, config.train
    dtype = dtype_of(m.dtype)

    vae_config = vae_config_from(m)
    vae = Functional.abstract(vae_factory(vae_config, dtype))
    tx, lr_schedule = make_optimizer(t)
    ema = t.ema_decay > 0
    step_key, scale_key = run_keys(config.seed)

    # ---- a resume's config, checked before the (slow) data is rendered
    manager = _checkpoint_manager(workdir / "checkpoints", config.checkpoint.keep)
    latest = manager.latest_step()
    try:
        check_resume_config(workdir, config, latest, allow=allow_config_change)
    except BaseException:
        manager.close()
        raise

    # ---- data: the train pool (deterministic from the config) and fixed test renders
    t0 = time.time()
    pool_np = make_renders("train", int(d.pool_size), set_size=int(d.set_size), workers=int(d.pool_workers))
    test_np = make_renders("test", int(d.eval_renders), set_size=int(d.set_size),
                           workers=int(d.pool_workers) if d.eval_renders >= 1024 else 0)
    pool = jax.device_put(pool_np)
    say(f"data: {len(pool_np)} train renders ({pool_np.nbytes / 2**20:.0f} MiB) + {len(test_np)} test renders "
        f"in {time.time() - t0:.1f}s")

    # ---- state: restore the latest checkpoint or init
    init_fn = lambda p: init_state(vae, p, tx, ema)  # noqa: E731
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            jax.eval_shape(init_fn, vae.param_shapes()))
    if latest is not None:
        state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        say(f"resumed from {workdir / 'checkpoints'} step {int(state['step'])}")
    else:
        state = jax.jit(init_fn)(init_params(vae, config.seed))
    n_params = count_params(state["params"])
    say(f"VAE {tuple(m.block_out_channels)} x{m.layers_per_block} groups {m.norm_num_groups} "
        f"attn {m.mid_block_add_attention}: {n_params / 1e6:.2f} M params ({n_params * 4 / 2**20:.1f} MiB f32), "
        f"dtype {m.dtype}, batch {d.batch_size}, {jax.devices()[0].device_kind}")

    step_fn = jax.jit(make_train_step(vae, tx, config), donate_argnums=(0,))
    # Evaluation, scaling factor and export run the VAE in float32 (the exported config has
    # force_upcast=True: pipelines decode in float32 whatever the training compute dtype was).
    eval_vae = vae if dtype == jnp.float32 else Functional.abstract(vae_factory(vae_config, jnp.float32))
    reconstruct = make_reconstruct(eval_vae)
    metrics_file = open(workdir / "metrics.jsonl", "a")

    def write_metrics(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

    step = int(state["step"])
    total = int(t.steps)
    compile_s, steps_per_s = 0.0, float("nan")
    t_train0 = time.time()
    guard = PreemptionGuard(sync_every=1)  # SIGTERM / SIGHUP / Ctrl-C: save the step reached, then stop
    preempted = False
    try:
        if step < total:
            t0 = time.time()
            compiled = step_fn.lower(state, pool, step_key).compile()
            compile_s = time.time() - t0
            lock.started()  # compiled: from here on what the run wrote stays, whatever happens
            say(f"compiled train step in {compile_s:.1f}s; training steps {step}..{total}")
            t_log, step_log = time.time(), step
            run_start, run_start_step = None, step
            while step < total:
                state, metrics = compiled(state, pool, step_key)
                step += 1
                if run_start is None:  # start timing after the first (warm-up) step
                    jax.block_until_ready(metrics["loss"])
                    run_start, run_start_step = time.time(), step
                    t_log, step_log = run_start, step
                if step % t.log_every == 0 or step == total:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.time()
                    rate = (step - step_log) / max(now - t_log, 1e-9) if step > step_log else float("nan")
                    overall = (step - run_start_step) / max(now - run_start, 1e-9) if step > run_start_step else rate
                    steps_per_s = overall
                    eta = (total - step) / overall if overall > 0 else float("nan")
                    lr = float(lr_schedule(step - 1))
                    say(f"step {step:6d}/{total}  loss {metrics['loss']:.4f}  l1 {metrics['l1']:.4f}  "
                        f"kl {metrics['kl']:.0f}  psnr {metrics['psnr']:5.2f} dB  lr {lr:.2e}  "
                        f"{rate:.2f} steps/s  ({rate * d.batch_size:.0f} img/s)  ETA {_fmt_time(eta)}")
                    write_metrics(dict(step=step, kind="train", lr=lr, steps_per_s=rate,
                                       elapsed_s=now - t_train0, **metrics))
                    t_log, step_log = now, step
                if d.eval_every and step % d.eval_every == 0 and step < total:
                    now_eval = time.time()
                    eval_params = state["ema"] if ema else state["params"]
                    q = evaluate_psnr(reconstruct, eval_params, test_np[:d.eval_quick], int(d.eval_batch))
                    say(f"step {step:6d}  test PSNR ({d.eval_quick} renders) {q:.2f} dB")
                    write_metrics(dict(step=step, kind="eval", test_psnr=q, n=int(d.eval_quick),
                                       elapsed_s=time.time() - t_train0))
                    paused = time.time() - now_eval
                    t_log += paused  # eval time is not train time
                    run_start += paused
                preempted = step < total and guard.should_stop(step)
                if step % config.checkpoint.every == 0 or step == total or preempted:
                    manager.save(step, args=ocp.args.StandardSave(state))
                if preempted:
                    say(guard.stop_message(step))
                    break
            manager.wait_until_finished()
        else:
            lock.started()  # a finished run: its outputs stay
            say(f"checkpoint step {step} >= train.steps {total}: nothing to train, re-exporting")
    finally:
        guard.restore_handlers()
    train_s = time.time() - t_train0
    manager.close()
    if preempted:
        metrics_file.close()
        (workdir / "summary.json").write_text(json.dumps({"status": "preempted", "step": step}, indent=2))
        return {"status": "preempted", "step": step}

    # ---- final evaluation, scaling factor, export
    final_params = jax.device_get(state["ema"] if ema else state["params"])
    scale_images = pool_np[: int(d.scale_renders)]
    scaling = latent_scaling_factor(eval_vae, final_params, scale_images, key=scale_key, batch=int(d.eval_batch))
    test_psnr = evaluate_psnr(reconstruct, final_params, test_np, int(d.eval_batch))
    say(f"test PSNR over {len(test_np)} test renders: {test_psnr:.2f} dB; latent scaling factor "
        f"1/std = {scaling:.5f} (from {len(scale_images)} train renders)")
    out_config = dataclasses.replace(vae_config, scaling_factor=scaling)
    export_dir = export_vae(workdir / "vae_export", out_config, final_params)
    # one render per test set (different subjects) where there are enough
    n_png = min(int(config.export.png_images), len(test_np))
    shown = test_np[np.arange(n_png) * max(1, min(int(d.set_size), len(test_np) // max(n_png, 1)))]
    png = save_reconstruction_png(workdir / "reconstructions.png", shown,
                                  reconstruct_all(reconstruct, final_params, shown, int(d.eval_batch)),
                                  zoom=int(config.export.png_zoom))
    summary = dict(status="done", step=step, test_psnr=test_psnr, eval_renders=len(test_np), scaling_factor=scaling,
                   steps_per_s=steps_per_s, compile_s=compile_s, train_s=train_s, num_params=n_params,
                   batch_size=int(d.batch_size), dtype=m.dtype, device=jax.devices()[0].device_kind,
                   export_dir=str(export_dir), png=str(png), vae_config=out_config.to_diffusers())
    previous = workdir / "summary.json"
    if compile_s == 0.0 and previous.exists():  # a re-export: keep the timings of the run that trained
        old = json.loads(previous.read_text())
        summary.update({k: old[k] for k in ("steps_per_s", "compile_s", "train_s") if k in old})
    previous.write_text(json.dumps(summary, indent=2))
    write_metrics(dict(step=step, kind="final", test_psnr=test_psnr, n=len(test_np), scaling_factor=scaling))
    metrics_file.close()
    say(f"exported {export_dir} (vae/config.json scaling_factor={scaling:.5f}); {png}")
    return dict(summary, params=final_params, vae_config=out_config)


def init_params(vae: Functional, seed: int) -> dict:
    """Fresh float32 params in numpy (milliseconds; jitting the Flax initializers takes tens of
    seconds on a busy CPU): kernels lecun-normal (normal, std 1/sqrt(fan_in), truncated at 2 std,
    as Flax's default), biases 0, norm scales 1. Deterministic from `seed`."""
    from jedi_jax.convert.torch_naming import flatten, unflatten

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5AE]))
    out = {}
    for path, s in sorted(flatten(vae.param_shapes()).items(), key=lambda kv: str(kv[0])):
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            w = rng.standard_normal(s.shape)
            while np.any(bad := np.abs(w) > 2.0):
                w[bad] = rng.standard_normal(int(bad.sum()))
            out[path] = (w / 0.87962566103423978 / np.sqrt(fan_in)).astype(np.float32)
        elif leaf == "bias":
            out[path] = np.zeros(s.shape, np.float32)
        elif leaf == "scale":
            out[path] = np.ones(s.shape, np.float32)
        else:
            raise ValueError(f"no initializer for parameter {path}")
    return unflatten(out)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "configs/mini_vae.py[:cpu|:gpu|:tiny]",
                                                  lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, export)")
    allow_flag = flags.DEFINE_bool("allow_config_change", False,
                                   "resume even when the config changes keys that change the trajectory")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(args):
        from jedi_jax.train.trainer import cli_exit_codes

        if len(args) > 1:
            print(f"error: unexpected arguments: {args[1:]}", file=sys.stderr)
            sys.exit(2)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
        with cli_exit_codes():  # a start-up mistake: one line, exit 2; a second Ctrl-C: exit 130
            summary = train(config_flag.value, workdir_flag.value, allow_config_change=allow_flag.value)
        keys = ("status", "step") if summary.get("status") == "preempted" else \
            ("step", "test_psnr", "scaling_factor", "export_dir", "png")
        print(json.dumps({k: summary[k] for k in keys}))
        return 0

    from jedi_jax.train.trainer import flags_parser

    app.run(_main, argv=argv, flags_parser=flags_parser(config_flag))
    return 0


if __name__ == "__main__":
    main()
