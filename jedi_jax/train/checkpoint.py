"""Checkpoints (orbax) and pre-emption handling for the train loop.

One checkpoint = one step folder `WORKDIR/checkpoints/<step>/` holding three items:

    state/   the TrainState (step, params, opt_state, ema_params), one array file per shard
    config/  the resolved run config (JSON)
    data/    the data iterator state (JSON, `SetLoader.get_state()`: global, process-count agnostic)

plus orbax's metrics (the checkpoint's loss), used to keep the best one. Orbax writes every step
into a temporary folder and renames it when the save is complete (atomic finalize), so a run
killed mid-save leaves either a complete checkpoint or none (the tmp folder is ignored and
cleaned up). Saves are asynchronous: `save` returns once the arrays are copied to host memory and
the files are written in the background (the train state can be donated right after).

Restore takes target shardings (a ShapeDtypeStruct tree with `.sharding`), so a checkpoint written
on one mesh / device count / process count restores onto any other.

Pre-emption: `PreemptionGuard` turns SIGTERM into a flag; the loop checks it at step boundaries
(agreeing across processes), saves, waits for the write to finish and exits 0.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger(__name__)

ITEMS = ("state", "config", "data")


class Checkpointer:
    """orbax CheckpointManager keeping the last `keep` checkpoints plus the `keep_best` best by a metric.

    Args:
      directory: the checkpoint folder (created).
      keep: number of most recent checkpoints kept.
      keep_best: number of best checkpoints (by `best_metric`) kept in addition (0 = none).
      best_metric / best_mode: the metrics key and 'min' | 'max'.
      async_save: background writes (orbax async checkpointing).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 best_mode: str = "min", async_save: bool = True):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies: list = [ocm.LatestN(n=max(1, int(keep)))]
        get_metric = lambda m: float(m[best_metric])  # noqa: E731
        if keep_best > 0:
            # BestN sorts ascending and keeps the tail: reverse for 'min' so the lowest comes last.
            policies.append(ocm.BestN(get_metric_fn=get_metric, reverse=best_mode == "min", n=int(keep_best),
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            best_fn=get_metric if keep_best > 0 else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        self._closed = False

    # ---- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # ---- save / restore ------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, config: Mapping, data_state: Mapping | None,
             metrics: Mapping[str, float] | None = None, force: bool = True) -> bool:
        """Starts saving `state` as checkpoint `step` (asynchronously). Returns whether it saves."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(dict(config)),
            data=ocp.args.JsonSave(dict(data_state or {})),
        )
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.best_metric not in metrics or not np.isfinite(metrics[self.best_metric]):
            metrics = None  # a checkpoint without a finite metric is never "best"
        return self.manager.save(int(step), args=args, metrics=metrics, force=force)

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict, dict]:
        """Restores (state, config dict, data state) of `step` (None = latest).

        target: the TrainState as ShapeDtypeStruct leaves carrying the TARGET shardings
        (`sharding.with_shardings(abstract_state, state_shardings)`), e.g. on a different mesh.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            config=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        ))
        return out.state, dict(out.config or {}), dict(out.data or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written and finalized."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending async saves, then closes; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self.manager.wait_until_finished()
        self.manager.close()


def read_json_item(directory: str | Path, item: str = "config", step: int | None = None) -> dict:
    """The 'config' or 'data' JSON of a checkpoint (latest if step is None); no arrays are read."""
    if item not in ("config", "data"):
        raise ValueError(f"item must be 'config' or 'data', got {item!r}")
    manager = ocp.CheckpointManager(Path(directory).absolute(), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = manager.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        out = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(out[item])
    finally:
        manager.close()


class PreemptionGuard:
    """SIGTERM (the usual pre-emption / `scancel` / `kill` signal) -> a flag the loop polls.

    `should_stop(step)` is True once any process got the signal. With several processes the flags
    are combined by an all-gather every `sync_every` steps (all processes call it at the same
    steps, so they stop at the same step boundary); a single process checks every step.
    """

    def __init__(self, sync_every: int = 10, signals=(signal.SIGTERM,)):
        self._flag = threading.Event()
        self.sync_every = max(1, int(sync_every))
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        else:  # signal handlers can only be installed from the main thread
            log.warning("PreemptionGuard created off the main thread: SIGTERM is not handled")

    def _handler(self, signum, frame):  # noqa: ARG002
        log.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
        self._flag.set()

    def request_stop(self) -> None:
        self._flag.set()

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def should_stop(self, step: int, *, sync: bool = False) -> bool:
        """Whether to stop after `step`. Collective with several processes when step % sync_every == 0
        or sync=True (every process must make the same call)."""
        if jax.process_count() == 1:
            return self._flag.is_set()
        if step % self.sync_every and not sync:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set(), np.int32))
        return bool(np.any(flags))

    def restore_handlers(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def config_to_json(config) -> dict:
    """ml_collections ConfigDict (or mapping) -> a JSON-able dict."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))
