r"""Train-step throughput and MFU of a config, without the input pipeline (a fixed synthetic batch).

    python -m jedi_jax.train.bench --config configs/sd15.py:h100x8 --config.model.pretrained= \
        --steps 20 [--out bench.json]

Builds the networks exactly as the trainer does (random init when model.pretrained is empty), compiles
the same train step ahead of time, then times `--steps` steps on one batch of random images / token
ids with the config's batch layout (members all real, one reference per set). Prints and returns
{'compile_s', 'step_s', 'steps_per_s', 'sets_per_s', 'images_per_s_per_chip', 'flops_per_step_per_device',
'mfu', 'peak_memory_gb', ...} plus the compiled step's memory analysis (argument / temporary GB) and
`est_max_sets_per_device`, the largest per-device batch those bytes extrapolate to (an estimate:
run again at that batch to confirm). MFU counts the FLOPs XLA executes (including the frozen VAE /
text encoders, and recomputation under remat).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jedi_jax.train import models as models_lib
from jedi_jax.train import sharding as shd
from jedi_jax.train import state as state_lib
from jedi_jax.train import step as step_lib

log = logging.getLogger("jedi_jax.train.bench")


def synthetic_batch(config, process_count: int = 1, models=None) -> dict:
    """This process's share of a batch with the loader's dtypes and shapes (B_local, N, ...): images,
    or, for a run on precomputed latents (data.latent_vae, e.g. configs/mini.py), latents of the
    models' VAE grid, so the timed step is the trainer's (no VAE encoder in it)."""
    d = config.data
    b, n, s, t = d.batch_size // process_count, d.set_size, d.image_size, config.model.max_text_len
    rng = np.random.default_rng(0)
    ref = np.zeros((b, n), bool)
    ref[:, 0] = n > 1
    batch = {"input_ids": rng.integers(0, 200, (b, n, t)).astype(np.int32),
             "member_mask": np.ones((b, n), bool), "ref_mask": ref}
    if str(d.get("latent_vae", "")) and models is not None:  # the pool source encodes with that VAE
        h = s // models.vae_factor
        batch["latents"] = rng.standard_normal((b, n, h, h, models.latent_channels)).astype(np.float32)
    else:
        batch["images"] = rng.uniform(-1, 1, (b, n, s, s, 3)).astype(np.float32)
    if step_lib.configured_uses_subject_weight(config):  # the step then reads subject masks too
        batch["masks"] = (rng.uniform(size=(b, n, s, s)) < 0.25).astype(np.float32)
    return batch


def memory_figures(compiled, local_sets: int, device=None) -> dict:
    """Bytes of the compiled step (XLA memory analysis) and the per-device batch they extrapolate to.

    Peak device memory of a step is about arguments (state, batch, frozen weights) + temporaries
    (activations, gradients), and the temporaries grow linearly with the batch; so the largest
    per-device batch is ~ (usable - arguments) / (temporaries per set). An estimate, labelled as one.
    """
    out: dict = {}
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        ma = None
    if ma is not None:
        out = {"argument_gb": ma.argument_size_in_bytes / 2**30, "temp_gb": ma.temp_size_in_bytes / 2**30,
               "output_gb": ma.output_size_in_bytes / 2**30, "alias_gb": ma.alias_size_in_bytes / 2**30}
    device = device or jax.local_devices()[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU has no memory stats
        limit = None
    if ma is not None and limit and ma.temp_size_in_bytes > 0:
        per_set = ma.temp_size_in_bytes / max(local_sets, 1)
        out["device_limit_gb"] = limit / 2**30
        out["est_max_sets_per_device"] = int((limit - ma.argument_size_in_bytes) // per_set)
    return out


def prepare(config) -> dict:
    """Networks, sharded state and the AOT-compiled step for `config` (everything but the timing)."""
    from jedi_jax.schedulers.schedule import NoiseScheduleConfig, make_schedule

    mesh = shd.mesh_from_config(config.mesh)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    t0 = time.perf_counter()
    bundle = models_lib.build(config.model, mesh=mesh, rules=rules, seed=config.seed)
    tx, lr = state_lib.make_optimizer(config.train)
    ema = config.train.ema_decay > 0
    if bundle.unet_params is None:
        init = lambda k: state_lib.create_state(bundle.unet_init(k), tx, ema)  # noqa: E731
        arg = jax.random.key(config.seed)
    else:
        init = lambda p: state_lib.create_state(p, tx, ema)  # noqa: E731
        arg = bundle.unet_params
    abstract = jax.eval_shape(init, arg)
    sh = state_lib.state_shardings_for(abstract, tx, mesh, rules)
    state = jax.jit(init, out_shardings=sh)(arg)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    schedule = make_schedule(NoiseScheduleConfig.from_train_config(config.schedule.to_dict()))
    fn = step_lib.configured_train_step(config, bundle.models, schedule, tx, lr)
    flops_fn = (step_lib.configured_train_step(config, bundle.flops_models, schedule, tx, lr)
                if bundle.flops_models is not None else None)
    local = synthetic_batch(config, jax.process_count(), bundle.models)
    bsh = shd.batch_sharding(mesh, rules)
    compiled, info = step_lib.compile_train_step(
        fn, abstract_state=abstract, state_shardings=sh,
        abstract_batch=step_lib.abstract_batch(local, jax.process_count()), batch_sharding=bsh,
        abstract_frozen=jax.eval_shape(lambda f: f, bundle.frozen), frozen_shardings=bundle.frozen_shardings,
        mesh=mesh, flops_train_step=flops_fn)
    key = jax.device_put(jax.random.key_data(jax.random.key(1)), shd.replicated(mesh))
    return {"compiled": compiled, "state": state, "batch": shd.global_batch(local, bsh), "frozen": bundle.frozen,
            "key": key, "init_s": init_s, "info": info, "unet_params_m": models_lib.count(abstract.params) / 1e6,
            "local_sets": int(config.data.batch_size) // shd.batch_divisor(mesh, rules)}  # sets per device


def time_steps(config, prep: dict, steps: int = 20) -> dict:
    """Times `steps` steps of a prepared (compiled) step after one warm-up step."""
    compiled, state, batch, frozen, key = (prep[k] for k in ("compiled", "state", "batch", "frozen", "key"))
    state, metrics = compiled(state, batch, frozen, key)  # warm-up
    float(metrics["loss"])
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, frozen, key)
    loss = float(metrics["loss"])  # blocks
    step_s = (time.perf_counter() - t1) / steps
    peak = float(config.train.peak_flops_per_chip) or step_lib.peak_flops_per_chip()
    flops = prep["info"]["flops"]
    mem = None
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        mem = stats.get("peak_bytes_in_use", 0) / 2**30 or None
    except Exception:  # CPU has no memory stats
        pass
    out = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "sets_per_device": prep["local_sets"], "set_size": int(config.data.set_size),
           "image_size": int(config.data.image_size), "dtype": str(config.model.dtype),
           "attention_kernel": str(config.model.attention_kernel), "remat": bool(config.model.remat),
           "init_s": prep["init_s"], "compile_s": prep["info"]["compile_s"], "step_s": step_s,
           "steps_per_s": 1 / step_s, "sets_per_s": config.data.batch_size / step_s,
           "sets_per_s_per_chip": config.data.batch_size / step_s / jax.device_count(),
           "images_per_s_per_chip": config.data.batch_size * config.data.set_size / step_s / jax.device_count(),
           "flops_per_step_per_device": flops, "flops_from": prep["info"].get("flops_from"), "mfu": (flops / step_s / peak) if (flops and peak) else None,
           "peak_memory_gb": mem, "loss": loss, "unet_params_m": prep["unet_params_m"]}
    out.update(memory_figures(compiled, prep["local_sets"]))
    return out


def bench(config, steps: int = 20, wait_for: str | None = None) -> dict:
    """prepare + time_steps; with `wait_for`, compile first and time only once that file exists."""
    prep = prepare(config)
    if wait_for:
        log.info("compiled in %.1fs; waiting for %s before timing", prep["info"]["compile_s"], wait_for)
        while not os.path.exists(wait_for):
            time.sleep(1.0)
    return time_steps(config, prep, steps)


_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sd15.py:tiny", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps")
_OUT = flags.DEFINE_string("out", None, "write the result as JSON here")
_WAIT = flags.DEFINE_string("wait_for", None, "compile first, then wait until this file exists before timing "
                            "(lets the compile overlap another job that holds the accelerator)")


def main(argv):
    from jedi_jax.train.trainer import ConfigError, check_inputs

    if len(argv) > 1:
        print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return 2
    try:
        check_inputs(_CONFIG.value, data=False)  # model folders, mesh vs devices: one line, not a traceback
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    res = bench(_CONFIG.value, _STEPS.value, _WAIT.value)
    log.info("%s", json.dumps(res))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    from jedi_jax.train.trainer import flags_parser

    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=flags_parser(_CONFIG))
