"""The JeDi training loop (big_vision / MaxDiffusion style): validate, build, restore-or-init,
compile ahead of time, loop, checkpoint, exit cleanly on SIGTERM.

    from jedi_jax.train.trainer import train
    result = train(config, "runs/tiny")     # what `python -m jedi_jax.train` calls

Outputs in WORKDIR:
    checkpoints/<step>/    orbax checkpoints (state, config JSON, data iterator state)
    metrics.jsonl          one JSON object per log line (process 0)
    tb/                    TensorBoard event files (process 0)
    samples/               sample grids, when `sample.every` > 0 (jedi_jax.train.hooks.sample_grid)

A run in a WORKDIR that holds a checkpoint resumes from the latest one: train state, data position
and PRNG stream (keys are fold_in(base_key, step)) continue exactly, so an interrupted run ends with
the parameters an uninterrupted one would have. On resume, metrics.jsonl and samples/metrics.jsonl
are cut back to the restored step and TensorBoard purges the later points, so steps a killed run
logged after its last checkpoint are not logged twice.

The config of a resumed run must be the checkpoint's, except for keys that only say how the run is
executed, logged, checkpointed or sampled (OPERATIONAL_KEYS: mesh.*, checkpoint.*, sample.*,
train.log_every, data.num_workers, ...; those differences are logged as warnings). Any other change
(seed, model.*, schedule.*, train.* optimizer settings, data.* that change the batches) would
silently continue a different run, or fail to restore a state of another structure, so it is
refused before anything is restored, naming the keys. A key the checkpoint's config lacks (added
by a newer version of the code) is refused too unless it is at its default (configs/common.py's
base_config), what the older code most likely did; one the current config lacks (removed) is only
warned about. Re-run with the checkpoint's values, or pass
`allow_config_change=True` (`python -m jedi_jax.train ... --allow_config_change`) to continue with
the new ones. train.steps may change while the lr schedule does not depend on it (constant decay,
warmup within both lengths). The frozen VAE and text encoder are not checkpointed but rebuilt at
each start; each checkpoint's config JSON holds their fingerprints, and a rebuild that differs is
refused the same way (check_frozen), as is an export (train/export.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jedi_jax.train import checkpoint as ckpt_lib
from jedi_jax.train import data as data_lib
from jedi_jax.train import models as models_lib
from jedi_jax.train import sharding as shd
from jedi_jax.train import state as state_lib
from jedi_jax.train import step as step_lib
from jedi_jax.train.hooks import sample_grid

log = logging.getLogger("jedi_jax.train")


# ----------------------------------------------------------------------------- config checks


class ConfigError(ValueError):
    """A config (or --workdir) that cannot run: the CLI prints it without a traceback."""


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # gs://b, and Path("gs://b") == "gs:/b"


def url_error(name: str, value) -> str | None:
    """Every path the trainer reads or writes goes through pathlib, which would turn gs://b/x into a
    local folder ./gs:/b/x on each host (no shared checkpoint, nothing in the bucket): refuse URLs."""
    if _URL.match(str(value)):
        return (f"{name}={str(value)!r}: jedi_jax reads and writes local paths only, not URLs; mount the bucket on "
                f"every host (e.g. gcsfuse, launch/README.md) and give the mounted path")
    return None


def validate_config(config) -> None:
    """Checks that do not need the models (run before anything is built). Raises ConfigError."""
    t, d, m, c = config.train, config.data, config.mesh, config.checkpoint
    errors = []
    for name, value in (("model.pretrained", config.model.pretrained), ("model.tokenizer", config.model.get("tokenizer", "")),
                        ("data.latent_vae", d.get("latent_vae", "")), ("data.pool_cache", d.get("pool_cache", "")),
                        ("data.source", data_lib.array_record_path(d) or "")):
        if error := url_error(name, value):
            errors.append(error)
    if t.steps < 1:
        errors.append(f"train.steps={t.steps} must be >= 1")
    if t.grad_accum < 1:
        errors.append(f"train.grad_accum={t.grad_accum} must be >= 1")
    if t.decay not in ("cosine", "constant"):
        errors.append(f"train.decay={t.decay!r} must be 'cosine' or 'constant'")
    # optimizer values that cannot be meant (a negative grad_clip would silently turn clipping off)
    for name, ok, want in (("lr", t.lr > 0, "> 0"), ("warmup_steps", t.warmup_steps >= 0, ">= 0"),
                           ("end_lr_factor", 0 <= t.end_lr_factor <= 1, "in [0, 1]"),
                           ("grad_clip", t.grad_clip >= 0, ">= 0 (0 = no clipping)"),
                           ("weight_decay", t.weight_decay >= 0, ">= 0"), ("b1", 0 <= t.b1 < 1, "in [0, 1)"),
                           ("b2", 0 <= t.b2 < 1, "in [0, 1)"), ("eps", t.eps > 0, "> 0"),
                           ("peak_flops_per_chip", t.peak_flops_per_chip >= 0, ">= 0 (0 = from the device table)")):
        if not ok:
            errors.append(f"train.{name}={t[name]} must be {want}")
    if t.grad_accum >= 1 and t.steps % t.grad_accum:
        errors.append(f"train.steps={t.steps} is not a multiple of train.grad_accum={t.grad_accum}: the last "
                      f"{t.steps % t.grad_accum} micro-steps' gradients would never be applied")
    if str(config.model.get("dtype", "float32")) == "float16":  # the UNet's gradients could underflow
        errors.append("model.dtype=float16: training has no loss scaling; use bfloat16")
    if not 0.0 <= t.ema_decay < 1.0:
        errors.append(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if t.log_every < 1 or c.every < 1:
        errors.append("train.log_every and checkpoint.every must be >= 1")
    if t.loss_weighting not in step_lib.LOSS_WEIGHTINGS:
        errors.append(f"train.loss_weighting={t.loss_weighting!r} must be one of {step_lib.LOSS_WEIGHTINGS}")
    if step_lib.configured_subject_weight(config) < 0:
        errors.append(f"train.subject_weight={t.subject_weight} must be >= 0")
    num_t = int(config.schedule.get("num_train_timesteps", 1000))
    if float(t.get("subject_weight_high_noise", -1.0)) >= 0 and not 0 <= int(t.get("high_noise_from_t", 0)) <= num_t:
        errors.append(f"train.high_noise_from_t={t.high_noise_from_t} must be in [0, {num_t}]")
    if config.schedule.prediction_type not in ("epsilon", "v_prediction"):
        errors.append(f"schedule.prediction_type={config.schedule.prediction_type!r}")
    if d.set_size < 1 or d.batch_size < 1:
        errors.append("data.set_size and data.batch_size must be >= 1")
    if not d.source:
        errors.append("data.source is empty: set e.g. --config.data.source=array_record:/data/sets "
                      "(or mini_world)")
    if data_lib.renders_mini_world(d):
        if d.hflip > 0:
            errors.append(f"data.hflip={d.hflip}: mini-world renders must not be mirrored (a mirrored (background, "
                          "left) is a held-out (background, right) pair); set data.hflip=0")
        if tuple(d.crop_scale) != (1.0, 1.0) or tuple(d.crop_ratio) != (1.0, 1.0):
            errors.append(f"data.crop_scale={tuple(d.crop_scale)} / crop_ratio={tuple(d.crop_ratio)}: mini-world renders "
                          "must not be cropped (the left part of a (background, center) render shows the subject at "
                          "the right: a held-out pair, under a caption saying center); set both to (1, 1)")
        if str(d.split) != "train":
            errors.append(f"data.split={d.split!r}: the mini world's other splits hold MiniBench's test subjects and "
                          "the held-out (background, placement) pairs; train on split='train'")
    if d.batch_size % jax.process_count():
        errors.append(f"data.batch_size={d.batch_size} must be divisible by the {jax.process_count()} processes")
    try:  # the random-init architectures, even where model.pretrained's folder replaces them: a
        # mistyped key there is a setting nothing reads (config files replace these sub-dicts whole,
        # so the config's lock does not cover their keys)
        models_lib.configs_from_dicts(config.model)
    except ValueError as e:
        errors.append(f"model.unet / vae / text_encoder: {e}")
    if len(m.axes) != len(m.shape):
        errors.append(f"mesh.shape={tuple(m.shape)} must have one entry per mesh.axes={tuple(m.axes)}")
    try:
        shd.check_rules(m.rules, m.axes)
    except ValueError as e:
        errors.append(str(e))
    if m.dcn_shape and len(m.dcn_shape) != len(m.axes):
        errors.append(f"mesh.dcn_shape={tuple(m.dcn_shape)} must have one entry per mesh axis")
    # the loop records only the training loss as the checkpoints' metric (lower is better)
    if c.best_metric != "loss" or c.best_mode != "min":
        errors.append(f"checkpoint.best_metric={c.best_metric!r} / best_mode={c.best_mode!r}: only 'loss' / 'min' "
                      "are recorded (the training loss)")
    if c.keep < 1 or c.keep_best < 0:
        errors.append(f"checkpoint.keep={c.keep} must be >= 1 and checkpoint.keep_best={c.keep_best} >= 0 "
                      "(0 = no best checkpoint kept)")
    if config.sample.every < 0:
        errors.append(f"sample.every={config.sample.every} must be >= 0 (0 = no sample grids)")
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


def validate_models(config, models: models_lib.Models, mesh) -> None:
    """Checks that need the resolved model configs and the mesh."""
    d = config.data
    errors = []
    f = models.vae_factor
    levels = len(models.unet_config.block_out_channels) - 1
    if d.image_size % (f * 2 ** levels):
        errors.append(f"data.image_size={d.image_size} must be divisible by vae factor {f} x 2^{levels} UNet "
                      f"downsamplings = {f * 2 ** levels}")
    if config.model.max_text_len > models.text_config.max_position_embeddings:
        errors.append(f"model.max_text_len={config.model.max_text_len} > text encoder's "
                      f"max_position_embeddings={models.text_config.max_position_embeddings}")
    div = shd.batch_divisor(mesh, config.mesh.rules)
    if d.batch_size % div:
        errors.append(f"data.batch_size={d.batch_size} must be divisible by the {div} devices of the batch axes")
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


def check_inputs(config, *, data: bool = True):
    """Checks what the config names outside itself, before the workdir is touched: the model folders
    (model.pretrained, data.latent_vae), an array_record data.source's path (when `data`) and the
    mesh against the devices there are. Raises ConfigError naming them; returns the mesh."""
    from jedi_jax.convert.pipeline_folder import model_folder_problem

    errors = []
    for name, folder in (("model.pretrained", config.model.pretrained),
                         ("data.latent_vae", config.data.get("latent_vae", ""))):
        if folder and (problem := model_folder_problem(folder)):
            errors.append(f"{name}={str(folder)!r}: {problem}")
    path = data_lib.array_record_path(config.data)
    if data and path is not None and not os.path.exists(path):
        errors.append(f"data.source={str(config.data.source)!r}: {path} does not exist")
    mesh = None
    try:
        mesh = shd.mesh_from_config(config.mesh)
    except ValueError as e:
        errors.append(f"mesh.shape={tuple(config.mesh.shape)}: {e}")
    if errors:
        raise ConfigError("; ".join(errors))
    return mesh


def check_frozen(config, frozen_fp: dict, stored_fp: dict | None, latest: int | None, *, allow: bool) -> None:
    """The frozen VAE and text encoder are rebuilt at every start (from model.pretrained, or from the
    seed: configs/mini.py's random CLIP), never checkpointed. A resume whose rebuild differs from the
    weights the checkpoint's UNet was trained with (another library's initializers, a re-exported
    pretrained folder) is refused like a config change. data.latent_vae must be the model's own VAE:
    the UNet learns latents that its samples and its export decode with model.pretrained's VAE.
    Runs on every process; they see the same config and digests, so all raise or none does."""
    if latest is not None and (differ := models_lib.frozen_mismatch(stored_fp, frozen_fp)):
        msg = (f"checkpoint {latest} was trained with other frozen weights than this start rebuilds: "
               f"{', '.join(differ)} (model.pretrained={config.model.pretrained!r}, seed={config.seed}); "
               "pass --allow_config_change to continue with the new ones")
        if not allow:
            raise ConfigChangeError(msg)
        log.warning("%s: continuing (--allow_config_change)", msg.split("; pass")[0])
    latent_vae = str(config.data.get("latent_vae", "") or "")
    if latent_vae and not _is_pretrained_vae(latent_vae, str(config.model.pretrained or "")):
        from jedi_jax.convert.param_io import params_fingerprint
        from jedi_jax.loading import load_component

        encoder = params_fingerprint(load_component(latent_vae, "vae").params)
        if encoder != frozen_fp["vae"]:
            raise ConfigError(f"data.latent_vae={latent_vae!r} is not the model's VAE (model.pretrained="
                              f"{config.model.pretrained!r}): the UNet would learn latents that its samples and "
                              "export decode with another VAE; give both the same folder")


def _is_pretrained_vae(latent_vae: str, pretrained: str) -> bool:
    """Whether data.latent_vae names the folder the frozen VAE was loaded from (models.build loads a
    folder's vae component, float32 params whatever the compute dtype): then they are the same
    weights by construction, and the check need not load and hash that VAE a second time (the
    data loader loads it to encode the pool anyway)."""
    if not pretrained or Path(latent_vae).resolve() != Path(pretrained).resolve():
        return False
    from jedi_jax.convert.pipeline_folder import read_model_index

    return "vae" in read_model_index(pretrained)


# Keys a resumed run may change: how the run is executed, logged, checkpointed or sampled, not what it
# computes (the mesh and the attention kernel only reorder floating-point sums; the pool cache is
# checked against the pool it stands for). A key ending in "." covers its section.
OPERATIONAL_KEYS = ("mesh.", "checkpoint.", "sample.", "train.log_every", "train.peak_flops_per_chip",
                    "data.num_workers", "data.prefetch", "data.pool_cache", "model.remat", "model.attention_kernel")
_ABSENT = "<absent>"


class ConfigChangeError(ValueError):
    """A resumed run's config changes keys that change the trajectory or the state's structure."""


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, checkpoint's value, current value) of every leaf that differs (_ABSENT: missing).
    A section one side lacks is compared leaf by leaf against nothing, so each of its keys is judged
    on its own (refused_changes)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, _ABSENT), current.get(k, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, prefix + k + ".")
        elif isinstance(a, dict) and b == _ABSENT or isinstance(b, dict) and a == _ABSENT:
            out += config_changes(a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}, prefix + k + ".")
        elif a != b:
            out.append((prefix + k, a, b))
    return out


def default_config(module: str = "configs.common") -> dict:
    """config_to_json(`module`.base_config()): what each key of this version of the code is when no
    config file sets it (configs.common for this trainer, configs.mini_vae for the VAE trainer), in
    the checkpoints' JSON form (lists, not tuples). {} (every added key refused, refused_changes)
    where the configs package cannot be imported (a config file outside this repository)."""
    import importlib

    try:
        return ckpt_lib.config_to_json(importlib.import_module(module).base_config())
    except ModuleNotFoundError as e:
        if e.name not in ("configs", module):
            raise
        log.warning("cannot import %s: keys absent from a checkpoint's config count as changed", module)
        return {}


def _leaves(tree: dict) -> dict[str, Any]:
    """{dotted key: leaf} of a nested dict, keyed as config_changes names them."""
    from jedi_jax.convert.torch_naming import flatten

    return {".".join(path): leaf for path, leaf in flatten(tree).items()}


def refused_changes(changes: list[tuple[str, Any, Any]], current: dict, *, defaults: dict,
                    operational=OPERATIONAL_KEYS, lr_schedule=None) -> list[tuple[str, Any, Any]]:
    """The changes a resume refuses without allow_config_change: all but
      - `operational` keys;
      - keys the checkpoint has and this config lacks (removed by this version of the code, which
        no longer reads them: warned about only);
      - keys the checkpoint lacks (added by this version) whose current value is their value in
        `defaults` (default_config(): the checkpoint's code most likely behaved like the default);
        one at another value, or that `defaults` lacks too (nothing says what the checkpoint ran
        with), is refused -- config files replace sub-dicts such as model.unet whole, so keys are
        compared leaf by leaf, by dotted key;
      - a train.steps the lr schedule (`lr_schedule(train_cfg)`; default
        state.learning_rate_schedule) does not depend on."""
    default_of = _leaves(defaults)

    def allowed(key, a, b):
        if b == _ABSENT or any(key == k or (k.endswith(".") and key.startswith(k)) for k in operational):
            return True
        if a == _ABSENT:
            return key in default_of and default_of[key] == b
        return key == "train.steps" and _steps_free_schedule(current["train"], int(a), int(b),
                                                             lr_schedule or state_lib.learning_rate_schedule)

    return [c for c in changes if not allowed(*c)]


def _steps_free_schedule(train_cfg: dict, steps_a: int, steps_b: int, lr_schedule) -> bool:
    """Whether the lr schedule applies the same lr at every update of the longer run for both run
    lengths: true for a constant decay after a warmup that fits in both, false when the cosine
    horizon moves with train.steps."""
    import ml_collections

    accum = max(1, int(train_cfg.get("grad_accum", 1)))
    updates = np.arange(max(steps_a, steps_b) // accum)
    a, b = (np.asarray(lr_schedule(ml_collections.ConfigDict(dict(train_cfg, steps=n)))(updates))
            for n in (steps_a, steps_b))
    return bool(np.array_equal(a, b))


def check_config_changes(saved: dict, current: dict, step: int, *, allow: bool, defaults: dict,
                         operational=OPERATIONAL_KEYS, lr_schedule=None) -> list[str]:
    """Compares the checkpoint's config with the run's (before anything is restored): logs every
    difference, raises ConfigChangeError naming the refused ones unless `allow`. Returns the
    changed keys (for a later restore error). `defaults` (the code's default config, in the same
    JSON form as `saved` and `current`), `operational` and `lr_schedule`: refused_changes."""
    changes = config_changes(saved, current)
    for key, a, b in changes:
        log.warning("config differs from checkpoint %d's: %s: %r -> %r", step, key, a, b)
    refused = refused_changes(changes, current, defaults=defaults, operational=operational, lr_schedule=lr_schedule)
    if refused and not allow:
        default_of = _leaves(defaults)

        def said(key, a, b):
            if a != _ABSENT:
                return f"{key} ({a!r} -> {b!r})"
            was = f"default {default_of[key]!r}" if key in default_of else "no default"
            return f"{key} (not in the checkpoint's config, {was} -> {b!r})"

        listed = ", ".join(said(*c) for c in refused)
        raise ConfigChangeError(f"the config differs from checkpoint {step}'s in keys that change the training "
                                f"trajectory or the state: {listed}; re-run with the checkpoint's values, or "
                                "pass --allow_config_change to continue with the new ones")
    if refused:
        log.warning("allow_config_change: continuing checkpoint %d with changed %s", step,
                    ", ".join(k for k, _, _ in refused))
    return [k for k, _, _ in changes]


# ----------------------------------------------------------------------------- metrics output


def trim_jsonl(path: Path, last_step: int) -> int:
    """Keeps the rows of a JSONL log with "step" <= last_step (and drops unreadable ones, such as a
    line torn by a kill); returns how many were dropped. Atomic (temp file + os.replace): a kill
    meanwhile leaves the old file or the new one. A resumed run re-logs the steps after its
    checkpoint, so without this they would appear twice."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= last_step
        except (ValueError, TypeError, KeyError):
            keep = False
        kept += [line] if keep else []
        dropped += not keep
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """metrics.jsonl + TensorBoard (process 0 only; other processes write nothing).

    `start_step`: the step training continues from. Rows a previous run logged after it are dropped
    from metrics.jsonl and samples/metrics.jsonl (they are logged again), and TensorBoard purges its
    points from start_step + 1 on (tensorboardX's purge_step)."""

    def __init__(self, workdir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        for path in (workdir / "metrics.jsonl", workdir / "samples" / "metrics.jsonl"):
            if trim_jsonl(path, start_step):
                log.info("%s: dropped rows after step %d (they are logged again)", path, start_step)
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1)
        except ImportError:  # pragma: no cover
            log.warning("tensorboardX is not installed: no TensorBoard logs")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (None if v is None else float(v)) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        try:
            if self._jsonl:
                self._jsonl.close()
        finally:
            if self._tb is not None:
                self._tb.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- the loop


def train(config, workdir: str | Path, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint). Returns a summary dict:
    {'status': 'done' | 'preempted', 'step', 'loss', 'steps_per_s', 'sets_per_s', 'compile_s', ...}.

    allow_config_change: resume even when the config changes keys that change the trajectory or the
    state (see the module docstring); otherwise that raises ConfigChangeError before any restore."""
    config.lock()  # unknown keys are errors from here on
    validate_config(config)
    if error := url_error("--workdir", workdir):
        raise ConfigError(error)
    mesh = check_inputs(config)
    updates = config.train.steps // config.train.grad_accum
    if config.train.warmup_steps > updates:  # legal (a smoke run of a big config), but say what it means
        log.warning("train.warmup_steps=%d exceeds the run's %d optimizer updates: the whole run is warmup and "
                    "reaches train.lr only at its last update", config.train.warmup_steps, updates)
    guard = ckpt_lib.PreemptionGuard(config.checkpoint.preemption_sync_every)  # SIGTERM, Ctrl-C from here on: flag
    opened: list = []  # closers of what _train opened; its loop's `finally` closes them on the way out
    try:
        # the whole run holds the workdir: a second trainer there stops before it touches anything
        with ckpt_lib.WorkdirLock(workdir) as lock:
            try:
                return _train(config, lock, mesh, guard, opened, allow_config_change)
            except BaseException:
                for close in reversed(opened):  # a failure before the loop (restore, first batch, compile)
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        log.exception("while closing after a failed start")
                lock.discard_new()  # a failed start leaves no empty folders behind (no-op once training began)
                raise
    finally:
        guard.restore_handlers()


def _train(config, lock: ckpt_lib.WorkdirLock, mesh, guard: ckpt_lib.PreemptionGuard, opened: list,
           allow_config_change: bool) -> dict[str, Any]:
    workdir = lock.path
    is_main = jax.process_index() == 0
    pc = jax.process_count()

    rules = tuple(tuple(r) for r in config.mesh.rules)
    log.info("mesh %s over %d devices (%d processes), %s", dict(mesh.shape), mesh.size, pc, jax.devices()[0].device_kind)

    ck = config.checkpoint
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=ck.keep, keep_best=ck.keep_best,
                                         best_metric=ck.best_metric, best_mode=ck.best_mode,
                                         async_save=ck.async_save)
    opened.append(checkpointer.close)
    latest = checkpointer.latest_step()
    resolved_config = ckpt_lib.config_to_json(config)
    changed: list[str] = []
    stored_frozen = None
    if latest is not None:  # before anything is built or restored: a refused change costs nothing
        stored = checkpointer.read_json("config", latest)
        stored_frozen = stored.pop(models_lib.FROZEN_KEY, None)
        changed = check_config_changes(stored, resolved_config, latest, allow=allow_config_change,
                                       defaults=default_config())
    bundle = models_lib.build(config.model, mesh=mesh, rules=rules, seed=config.seed, load_unet=latest is None)
    models = bundle.models
    validate_models(config, models, mesh)
    frozen_fp = models_lib.frozen_fingerprints(bundle.frozen)  # every process: gathers multi-process shards
    check_frozen(config, frozen_fp, stored_frozen, latest, allow=allow_config_change)
    resolved_config[models_lib.FROZEN_KEY] = frozen_fp  # every checkpoint names the frozen weights it trained with
    from jedi_jax.schedulers.schedule import NoiseScheduleConfig, make_schedule

    schedule = make_schedule(NoiseScheduleConfig.from_train_config(config.schedule.to_dict()))
    tx, lr_schedule = state_lib.make_optimizer(config.train)
    ema = config.train.ema_decay > 0
    init_key, step_key = jax.random.split(jax.random.key(config.seed))

    # Abstract-first: shapes and shardings of the whole state before any array exists.
    create = lambda p: state_lib.create_state(p, tx, ema)  # noqa: E731
    abstract = jax.eval_shape(create, models.unet.param_shapes())
    state_sh = state_lib.state_shardings_for(abstract, tx, mesh, rules)
    log.info("UNet: %.2fM trainable params (%s); frozen VAE %.2fM, text encoder %.2fM",
             models_lib.count(abstract.params) / 1e6, bundle.source,
             models_lib.count(bundle.frozen["vae"]) / 1e6, models_lib.count(bundle.frozen["text_encoder"]) / 1e6)

    try:
        loader = _make_loader(config, bundle)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        # what the data source names: a stale data.pool_cache, unreadable files, a factory module that
        # is not there (a missing path was already refused by check_inputs). Not RuntimeError: the
        # latent pool encodes on the device here, and a device's failure (JaxRuntimeError, out of
        # memory) is no mistake in the config: it keeps its traceback
        raise ConfigError(f"data.source={str(config.data.source)!r}: {e}") from e
    opened.append(lambda: _close(loader))
    if latest is not None:
        t0 = time.perf_counter()
        state, data_state = _restore(checkpointer, latest, shd.with_shardings(abstract, state_sh), changed)
        if data_state:
            loader.set_state(data_state)
        else:  # a checkpoint written without the loader's position: continue the order where it would be
            loader.set_state(loader.state_for_step(latest))
            log.warning("checkpoint %d has no data-iterator state: resuming the data order at step %d's batch",
                        latest, latest)
        log.info("resumed from %s/checkpoints/%d in %.1fs", workdir, latest, time.perf_counter() - t0)
    elif bundle.unet_params is not None:  # loaded (and widened) weights: optimizer state + EMA born sharded
        state = jax.jit(create, out_shardings=state_sh)(bundle.unet_params)
    else:  # random init, created directly in its shardings
        state = jax.jit(lambda k: create(bundle.unet_init(k)), out_shardings=state_sh)(init_key)
    bundle.unet_params = None  # the state owns the params now
    step = int(jax.device_get(state.step))

    summary: dict[str, Any] = {"status": "done", "step": step, "workdir": str(workdir)}
    total = int(config.train.steps)
    if step >= total:
        log.info("step %d >= train.steps %d: nothing to do", step, total)
        checkpointer.close()
        _close(loader)
        return summary

    # Ahead-of-time compilation on the first batch's shapes.
    bsh = shd.batch_sharding(mesh, rules)
    first = step_lib.select_batch(next(loader))
    train_step = step_lib.configured_train_step(config, models, schedule, tx, lr_schedule)
    flops_step = (step_lib.configured_train_step(config, bundle.flops_models, schedule, tx, lr_schedule)
                  if bundle.flops_models is not None else None)
    compiled, info = step_lib.compile_train_step(
        train_step, abstract_state=abstract, state_shardings=state_sh,
        abstract_batch=step_lib.abstract_batch(first, pc), batch_sharding=bsh,
        abstract_frozen=jax.eval_shape(lambda f: f, bundle.frozen), frozen_shardings=bundle.frozen_shardings,
        mesh=mesh, flops_train_step=flops_step)
    peak = float(config.train.peak_flops_per_chip) or step_lib.peak_flops_per_chip()
    flops = info["flops"]
    log.info("compiled train step in %.1fs; %s GFLOP/step/device (from %s); peak %s", info["compile_s"],
             "?" if flops is None else f"{flops / 1e9:.2f}", info["flops_from"],
             "n/a (cpu)" if peak is None else f"{peak / 1e12:.0f} TFLOP/s")
    summary.update(compile_s=info["compile_s"], flops_per_step_per_device=flops)

    base_key = jax.device_put(jax.random.key_data(step_key), shd.replicated(mesh))
    frozen = bundle.frozen
    writer = MetricsWriter(workdir, enabled=is_main, start_step=step)
    hook = sample_grid if config.sample.every > 0 else None
    sets_per_step = int(config.data.batch_size)
    images_per_step = sets_per_step * int(config.data.set_size)

    def save(at_step: int, loss: float | None) -> None:
        checkpointer.save(at_step, state, config=resolved_config, data_state=loader.get_state(),
                          metrics=None if loss is None else {ck.best_metric: loss})

    pending: list = []  # device metrics since the last log line
    window_losses: list[float] = []
    last_saved = step if latest is not None else -1
    t_log, step_log, t_start, step_start = time.perf_counter(), step, time.perf_counter(), step
    batch_np = first
    if guard.should_stop(step, sync=True):  # SIGTERM during start-up: nothing new to save
        log.warning("pre-empted during start-up: exiting at step %d without training", step)
        summary["status"] = "preempted"
        total = step
    lock.started()  # from here on what the run wrote stays, whatever happens
    try:
        while step < total:
            batch = shd.global_batch(batch_np, bsh)
            state, metrics = compiled(state, batch, frozen, base_key)
            step += 1
            pending.append(metrics)

            if step % config.train.log_every == 0 or step == total:
                values = jax.device_get(pending)
                pending = []
                now = time.perf_counter()
                sps = (step - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                window_losses.append(mean["loss"])
                row = {"loss": mean["loss"], "lr": values[-1]["lr"], "grad_norm": mean["grad_norm"],
                       "steps_per_s": sps, "sets_per_s": sps * sets_per_step,
                       "images_per_s_per_chip": sps * images_per_step / mesh.size,
                       "mfu": (flops * sps / peak) if (flops and peak) else None}
                writer.write(step, row)
                eta = (total - step) / max(sps, 1e-9)
                if is_main:
                    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
                    # the FLOPs are those XLA executes: under remat the recomputed forward counts too,
                    # a hardware-FLOPs utilisation (HFU) above the model-FLOPs one (the "mfu" key holds it)
                    log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | %.2f steps/s | %.1f sets/s | "
                             "%.1f img/s/chip | %s %s | ETA %s", step, total, row["loss"], row["lr"],
                             row["grad_norm"], sps, row["sets_per_s"], row["images_per_s_per_chip"],
                             "HFU" if config.model.remat else "MFU", mfu, _fmt_time(eta))
                summary.update(loss=row["loss"], steps_per_s=sps, sets_per_s=row["sets_per_s"],
                               images_per_s_per_chip=row["images_per_s_per_chip"], mfu=row["mfu"])

            if step % ck.every == 0 or step == total:
                save(step, float(np.mean(window_losses)) if window_losses else None)
                window_losses, last_saved = [], step

            # Agreed across processes (every one evaluates step < total alike). Asked before the sample
            # hook, whose grid (sampler compile + DDIM steps) would delay the pre-emption save past a
            # short grace period; not asked after the last step, which is saved and done anyway.
            # On a sample step every process asks (a collective), whatever preemption_sync_every says:
            # a flag seen only at the next sync step would come after the grid.
            sample_now = hook is not None and step % config.sample.every == 0
            stopping = step < total and guard.should_stop(step, sync=sample_now)
            if sample_now and not stopping:
                t_hook = time.perf_counter()
                params = state.ema_params if (ema and config.sample.use_ema) else state.params
                out = hook(step=step, workdir=workdir, config=config, models=models, unet_params=params,
                           frozen=frozen, batch=batch_np, tokenizer=bundle.tokenizer, mesh=mesh)
                t_log += time.perf_counter() - t_hook  # sampling time is not training throughput
                if out is not None and is_main:
                    log.info("step %d: samples -> %s (%.1fs)", step, out, time.perf_counter() - t_hook)

            if stopping:
                if last_saved != step:
                    save(step, None)
                    last_saved = step
                summary["status"] = "preempted"
                log.warning("%s", guard.stop_message(step))
                break
            if step < total:
                batch_np = step_lib.select_batch(next(loader))
    finally:  # each closer runs even when one before it raises (e.g. a failed final async write)
        try:
            checkpointer.close()  # waits for pending async saves: checkpoints are complete or absent
        finally:
            try:
                writer.close()
            finally:
                _close(loader)
    elapsed = time.perf_counter() - t_start
    if guard.received is not None:
        summary["signal"] = signal.Signals(guard.received).name
    summary.update(step=step, wall_s=elapsed,
                   mean_steps_per_s=(step - step_start) / max(elapsed, 1e-9))
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _restore(checkpointer: ckpt_lib.Checkpointer, step: int, target, changed: list[str]):
    """(state, data state) of checkpoint `step`; a failure names the config keys that differ from
    the checkpoint's (allowed by allow_config_change or operational), the likely cause."""
    try:
        state, _, data_state = checkpointer.restore(step, target)
    except Exception as e:
        if not changed:
            raise
        raise ValueError(f"cannot restore checkpoint {step} into the state this config builds (the config differs "
                         f"from the checkpoint's in {', '.join(changed)}): {e}") from e
    return state, data_state


def _make_loader(config, bundle):
    from jedi_jax.train.data import make_loader

    return make_loader(config.data, tokenize_fn=bundle.tokenizer, seed=config.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       with_masks=step_lib.configured_uses_subject_weight(config))  # only the loss reads them


def _close(loader) -> None:
    close = getattr(loader, "close", None)
    if close:
        close()


# ----------------------------------------------------------------------------- command lines

# Mistakes in what a user asked for, found at start-up: the CLIs print them as one `error:` line, exit 2.
USER_ERRORS = (ConfigError, ConfigChangeError, ckpt_lib.WorkdirError)
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


@contextlib.contextmanager
def cli_exit_codes():
    """Around a trainer's run in its CLI: a user's mistake at start-up (USER_ERRORS) is one `error:`
    line and exit status 2; a second Ctrl-C (the first one saves and stops), or one before training,
    is one line and 130. Anything else keeps its traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted: stopped without saving the step reached", file=sys.stderr)
        raise SystemExit(130) from None


def flags_parser(config_flag):
    """absl `flags_parser` for the trainers' CLIs (app.run(main, flags_parser=...)): a mistake on the
    command line (an unknown flag or config key, a config file or variant that is not there, a bad
    value) prints one `error:` line and exits 2 instead of a traceback; --help exits 0 (absl: 1).
    Errors of other types (a config file's own bug: NameError, SyntaxError) keep their traceback."""
    from absl import flags

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
            config_flag.value.lock()  # config_flags defers a config file's load error to the first use
            return rest
        except SystemExit as e:
            names = {a.lstrip("-").split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
            if e.code == 1 and names & set(_HELP_FLAGS):  # absl exits 1 after printing the help asked for
                raise SystemExit(0) from None
            raise
        except (flags.Error, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            line = _flag_error_line(e, argv, config_flag.name)
            if line is None:  # not the command line's mistake: a config file's own bug keeps its traceback
                raise
            print(f"error: {line}", file=sys.stderr)
            raise SystemExit(2) from None

    return parse


def _flag_error_line(e: Exception, argv, name: str) -> str | None:
    """One line for a flag-parsing error (their messages span lines: tracebacks, tried paths); None
    for a KeyError / AttributeError that no --config.* override explains (a config file's bug)."""
    text = str(e)
    context = e if isinstance(e, KeyError) else e.__context__
    if isinstance(e, (KeyError, AttributeError)):
        if not (isinstance(context, KeyError) and context.args):
            return None
        # ml_collections: an override of a key the locked config lacks ("'step'\nDid you mean ...")
        key, *hint = str(context.args[0]).splitlines()
        key = key.strip("'\"")
        overrides = [a.lstrip("-").split("=", 1)[0] for a in argv[1:] if a.lstrip("-").startswith(name + ".")]
        named = [o for o in overrides if key in o.split(".")[1:]]
        if not named:
            return None
        hint = " ".join(hint)
        return f"--{named[0]}: the config has no key {key!r}" + (f" ({hint[:1].lower()}{hint[1:]})" if hint else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in text:  # config_flags wraps a config file's ValueError / TypeError
        head = text.split(": Error whilst parsing config file", 1)[0]
        files = re.findall(r'File "([^"]+)", line (\d+)', text)
        return f"{head}: {lines[-1]}" + (f" ({files[-1][0]}:{files[-1][1]})" if files else "")
    if "Failed loading config file" in text:  # the file is not there ("[Errno 2] No such file ...")
        return f"--{name}: cannot load the config file: {lines[-1]}"
    return " ".join(lines)
