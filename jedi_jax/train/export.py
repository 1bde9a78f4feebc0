"""Export a training run as a jedi_jax model folder (what JeDiPipeline / the demo / MiniBench load).

    python -m jedi_jax.train.export --workdir runs/mini --dst runs/jedi_mini [--step N]
        [--no-ema] [--store-dtype bfloat16] [--overwrite]

An existing --dst (e.g. the shipped jedi_jax/assets/jedi_mini) is refused unless --overwrite is given.

The folder gets the UNet of the checkpoint (EMA weights unless --no-ema), the frozen VAE and text
encoder exactly as the run built them (from config.model.pretrained, or the seeded random init),
the run's tokenizer and its noise schedule as a diffusers DDIMScheduler config. --store-dtype
bfloat16 halves the files (loading restores float32), for models shipped inside the package.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jedi_jax.convert.pipeline_folder import write_model_folder
from jedi_jax.schedulers.schedule import NoiseScheduleConfig
from jedi_jax.train import checkpoint as ckpt_lib
from jedi_jax.train import models as models_lib
from jedi_jax.train import sharding as shd
from jedi_jax.train import state as state_lib


class ExportError(ValueError):
    """A run that cannot be exported as it was trained (one error line from the CLI)."""


def export_run(workdir: str | Path, dst: str | Path, *, step: int | None = None, use_ema: bool = True,
               store_dtype=None, overwrite: bool = False, allow_frozen_change: bool = False, log=print) -> Path:
    """Writes checkpoint `step` (None = latest) of the run in `workdir` as a model folder at `dst`.

    Safe while the run is still training: the checkpoints are opened read-only (a writer-style
    manager would delete the run's in-flight async save), and the step is resolved once, so the
    config and the state come from the same checkpoint even when the run saves a newer one meanwhile.
    """
    workdir = Path(workdir)
    if not workdir.exists():  # else: "no checkpoint in .../checkpoints (has [])", as if the run had not saved yet
        raise ExportError(f"--workdir {workdir} does not exist (give a training run's --workdir)")
    if not (workdir / "checkpoints").is_dir():
        raise ExportError(f"--workdir {workdir}: no checkpoints/ folder there (a training run's --workdir)")
    reader = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        step = reader.resolve_step(step)
        stored = reader.read_json("config", step)
        stored_frozen = stored.pop(models_lib.FROZEN_KEY, None)
        config = ml_collections.ConfigDict(stored)
        # one device, but the run's own axis names: its rules may name axes beyond data / fsdp
        axes = tuple(config.mesh.get("axes", ("data", "fsdp")))
        mesh = shd.make_mesh(axes, (1,) * len(axes), devices=jax.devices()[:1])
        rules = tuple(tuple(r) for r in config.mesh.rules)
        bundle = models_lib.build(config.model, mesh=mesh, rules=rules, seed=config.seed, load_unet=False)
        models = bundle.models
        rebuilt = models_lib.frozen_fingerprints(bundle.frozen)
        differ = models_lib.frozen_mismatch(stored_frozen, rebuilt)
        if differ and allow_frozen_change:  # e.g. a random frozen encoder rebuilt on another platform
            log(f"warning: the rebuilt frozen {', '.join(differ)} differ from the weights the run trained with "
                "(--allow-frozen-change): exporting the rebuilt ones")
        elif differ:  # the folder would ship a component the UNet was never trained with
            raise ExportError(f"{workdir} step {step}: rebuilding the frozen {', '.join(differ)} (model.pretrained="
                             f"{config.model.pretrained!r}, seed {config.seed}) does not give the weights the run "
                             "trained with; restore that folder or library version before exporting (a random "
                             "init on another platform can differ in its last bits: --allow-frozen-change)")
        tx, _ = state_lib.make_optimizer(config.train)
        abstract = jax.eval_shape(lambda p: state_lib.create_state(p, tx, config.train.ema_decay > 0),
                                  models.unet.param_shapes())
        shardings = state_lib.state_shardings_for(abstract, tx, mesh, rules)
        state, _, _ = reader.restore(step, shd.with_shardings(abstract, shardings))
    finally:
        reader.close()
    used_ema = use_ema and state.ema_params is not None
    if use_ema and not used_ema:
        log(f"note: {workdir} kept no EMA (train.ema_decay=0): exporting its raw weights")
    unet = state.ema_params if used_ema else state.params
    cast = (lambda t: jax.tree.map(lambda x: jnp.asarray(x, store_dtype), t)) if store_dtype else (lambda t: t)
    parts = {
        "unet": ("unet", models.unet_config, cast(unet)),
        "vae": ("vae", models.vae_config, cast(bundle.frozen["vae"])),
        "text_encoder": ("clip_text", models.text_config, cast(bundle.frozen["text_encoder"])),
    }
    tokenizer_dir = models_lib.tokenizer_folder(config.model)
    with tempfile.TemporaryDirectory() as tmp:
        sched = Path(tmp) / "scheduler"
        sched.mkdir()
        # every key spelled out: a diffusers reader fills missing ones with DDIMScheduler's defaults
        # (clip_sample=True, steps_offset=0, ...), which is not the schedule the trainer used
        trained = NoiseScheduleConfig.from_train_config(config.schedule.to_dict())
        (sched / "scheduler_config.json").write_text(json.dumps(trained.to_diffusers(), indent=2))
        tok = Path(tmp) / "tokenizer"
        shutil.copytree(tokenizer_dir, tok)
        out = write_model_folder(dst, parts, extra_folders={"tokenizer": tok, "scheduler": sched},
                                 overwrite=overwrite, sampling=_sampling_entry(config.model),
                                 source=f"{workdir} step {int(state.step)} ({'EMA' if used_ema else 'raw'} UNet)")
    log(f"exported step {int(state.step)} of {workdir} to {out}")
    return out


def _sampling_entry(model_cfg) -> dict:
    """What sampling must know about how the UNet was trained: the text layer, unless SD's "last"."""
    layer = models_lib._text_layer(model_cfg.get("text_layer", "last"))
    return {} if layer == "last" else {"text_layer": layer}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--store-dtype", default=None, choices=[None, "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-frozen-change", action="store_true",
                   help="export even when the rebuilt frozen VAE / text encoder differ from the run's")
    args = p.parse_args(argv)
    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.train.trainer import ConfigError

    try:
        export_run(args.workdir, args.dst, step=args.step, use_ema=not args.no_ema,
                   store_dtype=getattr(jnp, args.store_dtype) if args.store_dtype else None, overwrite=args.overwrite,
                   allow_frozen_change=args.allow_frozen_change)
    # ConversionError: the run's model.pretrained folder is gone or damaged; ConfigError: it no longer
    # fits the run (models.tokenizer_folder)
    except (FileNotFoundError, FileExistsError, ExportError, ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
