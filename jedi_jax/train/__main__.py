"""`python -m jedi_jax.train --config configs/sd15.py:tiny --workdir runs/tiny [--config.train.steps=100]`

Trains JeDi (see jedi_jax/train/trainer.py). Re-running the same command in the same workdir
resumes from the latest checkpoint. SIGTERM, SIGHUP or a first Ctrl-C: checkpoint at the next step
boundary, exit 0 (a second Ctrl-C aborts without saving, exit 130). One run per workdir: a second
one there stops at once (WORKDIR/.lock). Mistakes in what was asked for (flags, config keys and
values, a missing config file, model folder or data set, a mesh the devices cannot make, a busy
workdir) stop with one `error:` line, exit 2, leaving no folder behind.
A resume whose config changes keys that change the trajectory (seed, model.*, schedule.*, train.lr,
data.batch_size, ...; all but mesh.*, checkpoint.*, sample.*, train.log_every, data.num_workers and
the like) stops with one `error:` line naming them, exit 2; --allow_config_change continues anyway.

Multi-host: every process runs the same command. `jax.distributed.initialize` is called when
  * --coordinator=HOST:PORT --num_processes=P --process_id=I are given (any platform; on CPU the
    collectives use gloo), or
  * --distributed is given or auto-detected: a TPU VM slice with several workers
    (TPU_WORKER_HOSTNAMES), or a SLURM job step with several tasks (SLURM_NTASKS > 1), where JAX
    finds the coordinator itself.
See launch/README.md.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sd15.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, samples)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume even when the config changes keys that change the trajectory or the "
    "state (seed, model, schedule, optimizer, batches) from the checkpoint's; without it such a resume stops")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None, "call jax.distributed.initialize() with auto-detection "
                                 "(default: auto on multi-worker TPU VMs and multi-task SLURM steps)")


def _auto_distributed() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    try:
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    except ValueError:
        return False


def initialize_distributed() -> None:
    """jax.distributed.initialize() when this is a multi-process run (see module docstring)."""
    import jax

    if _COORDINATOR.value:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator needs --num_processes and --process_id")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value or (_DISTRIBUTED.value is None and _auto_distributed()):
        jax.distributed.initialize()


def main(argv) -> int:
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not _WORKDIR.value:
            raise app.UsageError("--workdir is required")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stdout, force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
        initialize_distributed()
    except app.UsageError as e:  # absl would print the whole --help text around it
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() != 0:  # keep other processes' logs to warnings
        logging.getLogger().setLevel(logging.WARNING)
    from jedi_jax.train.trainer import cli_exit_codes, train

    with cli_exit_codes():  # a start-up mistake: one line, exit 2; a second Ctrl-C: exit 130
        summary = train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    logging.getLogger("jedi_jax.train").info("finished: %s", {k: summary[k] for k in ("status", "step") if k in summary})
    return 0


def _parse_flags(argv):
    from jedi_jax.train.trainer import flags_parser  # imports jax; initializes no backend

    return flags_parser(_CONFIG)(argv)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
