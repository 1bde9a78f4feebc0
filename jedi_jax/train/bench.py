"""Train-step throughput and MFU of a config, without the input pipeline (a fixed synthetic batch).

    python -m jedi_jax.train.bench --config configs/sd15.py:h100x8 --config.model.pretrained= \
        --steps 20 [--out bench.json]

Builds the networks exactly as the trainer does (random init when model.pretrained is empty), compiles
the same train step ahead of time, then times `--steps` steps on one batch of random images / token
ids with the config's batch layout (members all real, one reference per set). Prints and returns
{'compile_s', 'step_s', 'steps_per_s', 'sets_per_s', 'images_per_s_per_chip', 'flops_per_step_per_device',
'mfu', 'peak_memory_gb'}. MFU counts the FLOPs XLA executes (including the frozen VAE / text
encoders, and recomputation under remat).
"""
from __future__ import annotations

import json
import logging
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


def synthetic_batch(config, process_count: int = 1) -> dict:
    """This process's share of a batch with the loader's dtypes and shapes (B_local, N, ...)."""
    d = config.data
    b, n, s, t = d.batch_size // process_count, d.set_size, d.image_size, config.model.max_text_len
    rng = np.random.default_rng(0)
    ref = np.zeros((b, n), bool)
    ref[:, 0] = n > 1
    return {"images": rng.uniform(-1, 1, (b, n, s, s, 3)).astype(np.float32),
            "input_ids": rng.integers(0, 200, (b, n, t)).astype(np.int32),
            "member_mask": np.ones((b, n), bool), "ref_mask": ref}


def bench(config, steps: int = 20) -> dict:
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

    schedule = make_schedule(NoiseScheduleConfig(**config.schedule.to_dict()))
    fn = step_lib.make_train_step(bundle.models, schedule, tx, lr, prediction_type=config.schedule.prediction_type,
                                  ema_decay=float(config.train.ema_decay))
    local = synthetic_batch(config, jax.process_count())
    bsh = shd.batch_sharding(mesh, rules)
    compiled, info = step_lib.compile_train_step(
        fn, abstract_state=abstract, state_shardings=sh,
        abstract_batch=step_lib.abstract_batch(local, jax.process_count()), batch_sharding=bsh,
        abstract_frozen=jax.eval_shape(lambda f: f, bundle.frozen), frozen_shardings=bundle.frozen_shardings,
        mesh=mesh)
    batch = shd.global_batch(local, bsh)
    key = jax.device_put(jax.random.key_data(jax.random.key(1)), shd.replicated(mesh))
    state, metrics = compiled(state, batch, bundle.frozen, key)  # warm-up
    float(metrics["loss"])
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, bundle.frozen, key)
    loss = float(metrics["loss"])  # blocks
    step_s = (time.perf_counter() - t1) / steps
    peak = float(config.train.peak_flops_per_chip) or step_lib.peak_flops_per_chip()
    flops = info["flops"]
    mem = None
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        mem = stats.get("peak_bytes_in_use", 0) / 2**30 or None
    except Exception:  # CPU has no memory stats
        pass
    out = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "init_s": init_s,
           "compile_s": info["compile_s"], "step_s": step_s, "steps_per_s": 1 / step_s,
           "sets_per_s": config.data.batch_size / step_s,
           "images_per_s_per_chip": config.data.batch_size * config.data.set_size / step_s / jax.device_count(),
           "flops_per_step_per_device": flops, "mfu": (flops / step_s / peak) if (flops and peak) else None,
           "peak_memory_gb": mem, "loss": loss, "unet_params_m": models_lib.count(abstract.params) / 1e6}
    return out


_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sd15.py:tiny", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps")
_OUT = flags.DEFINE_string("out", None, "write the result as JSON here")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    res = bench(_CONFIG.value, _STEPS.value)
    log.info("%s", json.dumps(res))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
