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

Pre-emption: `PreemptionGuard` turns SIGTERM (and SIGHUP, and a first Ctrl-C) into a flag; the loop
checks it at step boundaries (agreeing across processes), saves, waits for the write to finish and
exits 0.

One run per workdir: `WorkdirLock` holds an exclusive lock on WORKDIR/.lock for the whole run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger(__name__)

ITEMS = ("state", "config", "data")


class _OrbaxNoise(logging.Filter):
    """Drops orbax warnings about what this module asks for on purpose: a read-only manager (every
    reader of a live run opens one, once per checkpoint) and a save without metrics (a checkpoint
    with no finite loss, see Checkpointer.save). Exactly these format strings; every other absl /
    orbax message passes."""

    MESSAGES = frozenset({
        "Given directory is read only=%s",
        "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
        "Requested `tracked_metric`; did not provide metrics.",
    })

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg in self.MESSAGES)  # (msg may be any object)


def _quiet_orbax() -> None:
    logger = logging.getLogger("absl")  # orbax logs through absl.logging, i.e. this logger
    if not any(isinstance(f, _OrbaxNoise) for f in logger.filters):
        logger.addFilter(_OrbaxNoise())


def _handlers() -> dict:
    """The items' handlers, given up front (not inferred at the first save or restore) so that a
    fresh manager can read a checkpoint's state metadata (dtypes) before restoring it."""
    return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()}


class Checkpointer:
    """orbax CheckpointManager keeping the last `keep` checkpoints plus the `keep_best` best by a metric.

    Args:
      directory: the checkpoint folder (created, unless read_only).
      keep: number of most recent checkpoints kept.
      keep_best: number of best checkpoints (by `best_metric`) kept in addition (0 = none).
      best_metric / best_mode: the metrics key and 'min' | 'max'.
      async_save: background writes (orbax async checkpointing).
      read_only: for readers (export, learning curves) of a run that may still be training: creates
        nothing, saves and deletes nothing and leaves the `<step>.orbax-checkpoint-tmp` folders alone.
        A writer's manager deletes those on start (left-overs of a killed run), which from a reader
        would delete the training's in-flight async save and crash that run at its next save.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_best: int = 1, best_metric: str = "loss",
                 best_mode: str = "min", async_save: bool = True, read_only: bool = False):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.read_only = read_only
        _quiet_orbax()
        get_metric = lambda m: float(m[best_metric])  # noqa: E731
        best_fn = get_metric if keep_best > 0 else None
        if read_only:  # orbax then also turns off create and the tmp-folder cleanup; both spelled out
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   enable_async_checkpointing=False, best_fn=best_fn,
                                                   best_mode=best_mode)
        else:
            policies: list = [ocm.LatestN(n=max(1, int(keep)))]
            if keep_best > 0:
                # BestN sorts ascending and keeps the tail: reverse for 'min' so the lowest comes last.
                policies.append(ocm.BestN(get_metric_fn=get_metric, reverse=best_mode == "min", n=int(keep_best),
                                          keep_checkpoints_without_metrics=False))
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocm.AnyPreservationPolicy(policies),
                best_fn=best_fn,
                best_mode=best_mode,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, item_handlers=_handlers(),
                                             options=options)
        self._closed = False

    # ---- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def resolve_step(self, step: int | None) -> int:
        """`step`, or the latest when None; FileNotFoundError naming the steps there when it is absent.
        Readers resolve once and read everything of that step (a live run may add and delete steps
        between two calls of latest_step)."""
        steps = self.all_steps()
        resolved = self.latest_step() if step is None else int(step)
        if resolved is None or resolved not in steps:
            raise FileNotFoundError(f"no checkpoint {'' if step is None else f'{step} '}in {self.directory} "
                                    f"(has {steps})")
        return resolved

    # ---- save / restore ------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, config: Mapping, data_state: Mapping | None,
             metrics: Mapping[str, float] | None = None, force: bool = True) -> bool:
        """Starts saving `state` as checkpoint `step` (asynchronously). Returns whether it saves."""
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read-only: it cannot save")
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
        Strict: orbax refuses other shapes and tree structures, and `dtype_problems` other dtypes
        (orbax would cast them silently).
        """
        step = self.resolve_step(step)
        problems = dtype_problems(self.manager.item_metadata(step).state, target)
        if problems:
            raise ValueError(f"checkpoint {step} in {self.directory} does not fit the run's state: "
                             + "; ".join(problems))
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            config=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        ))
        return out.state, dict(out.config or {}), dict(out.data or {})

    def read_json(self, item: str = "config", step: int | None = None) -> dict:
        """The 'config' or 'data' JSON of checkpoint `step` (latest if None); no arrays are read."""
        if item not in ("config", "data"):
            raise ValueError(f"item must be 'config' or 'data', got {item!r}")
        step = self.resolve_step(step)
        out = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(out[item] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written and finalized."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending async saves, then closes; a second call does nothing. A failed wait
        (an async write that failed) raises and leaves it open, so a retry closes it."""
        if self._closed:
            return
        self.manager.wait_until_finished()
        # orbax starts a thread at construction that clears unfinished tmp folders of earlier runs, and its
        # close() does not wait for it: a failed start that then removes the workdir it made raced that
        # thread (a FileNotFoundError traceback in the log). Wait for it here (private in orbax 0.11).
        wait_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_cleanup is not None:
            wait_cleanup()
        self.manager.close()
        self._closed = True


def dtype_problems(stored: Any, target: Any) -> list[str]:
    """'leaf: stored as X, the run expects Y' for every leaf of both trees whose dtypes differ.
    `stored` is orbax's state metadata; leaves only one tree has are left to orbax's own error."""
    if stored is None:  # no metadata to compare with: orbax's restore is the check
        return []
    stored_flat = ocp.tree.to_flat_dict(stored)
    problems = []
    for key, want in ocp.tree.to_flat_dict(target).items():
        have = stored_flat.get(key)
        have_dtype, want_dtype = getattr(have, "dtype", None), getattr(want, "dtype", None)
        if have_dtype is not None and want_dtype is not None and np.dtype(have_dtype) != np.dtype(want_dtype):
            problems.append(f"{'/'.join(map(str, key))}: stored as {np.dtype(have_dtype)}, "
                            f"the run expects {np.dtype(want_dtype)}")
    return problems


def read_json_item(directory: str | Path, item: str = "config", step: int | None = None) -> dict:
    """The 'config' or 'data' JSON of a checkpoint (latest if step is None); no arrays are read.
    Read-only: safe to call on the folder of a run that is training (see Checkpointer.read_only)."""
    reader = Checkpointer(directory, read_only=True)
    try:
        return reader.read_json(item, step)
    finally:
        reader.close()


class WorkdirError(RuntimeError):
    """The workdir cannot be used: another run holds it, or it cannot be created. A user's problem:
    the CLIs print it as one `error:` line (exit status 2)."""


class WorkdirLock:
    """Exclusive lock on a run's workdir, held for the whole run: a second trainer started on the
    same folder would resume from the first one's checkpoints, trim its metrics.jsonl and write
    checkpoints beside it. fcntl.flock on WORKDIR/.lock, non-blocking: the second one stops at once
    (WorkdirError naming the holder's pid) before it touches anything. The OS drops the lock when
    the holder's process ends however it ends (SIGKILL too), so a killed run's folder is free for
    its resume. The .lock file stays: deleting it while another process may have it open would let
    two processes hold locks on two different files.

    Entering creates the workdir. A start that fails calls `discard_new()`, which removes what this
    start created there, until `started()` says training began (from then on the run's outputs
    stay, even on a crash): the workdir itself when it did not exist (and the parent folders made
    for it, while empty); in a workdir that existed, only the trainers' own outputs (OUTPUTS) that
    were not there before -- never another program's files, and nothing at all where the lock
    could not be taken.

    flock is as good as the file system's locks: on a FUSE mount without lock support (gcsfuse) or
    NFS mounted `nolock`, it holds only among the processes of one host, so two runs whose process
    0 sit on different hosts are not told apart there.

    Several processes (jax.process_count() > 1) share one workdir: only process 0 locks (the others
    would block it) and creates the folder; then every process learns the outcome through one
    all-gather, so when process 0 cannot lock, all of them raise here, before any other collective
    (none waits for a process 0 that has gone). Every process must enter at the same point.
    """

    NAME = ".lock"
    # what the trainers write into a workdir at start-up (train/trainer.py, train/vae_trainer.py)
    OUTPUTS = frozenset({"checkpoints", "config.json", "metrics.jsonl", "tb", "samples", "summary.json"})

    def __init__(self, workdir: str | Path):
        self.shown = str(workdir)  # as the user wrote it, for messages
        self.path = Path(os.path.abspath(workdir))  # ".." folded: "missing/../run" is run, not a new folder
        self.file = self.path / self.NAME
        self._fd: int | None = None
        self._created: Path | None = None  # the top-most folder this start created
        self._before: set[str] | None = None  # the workdir's entries before this start (None: discard nothing)

    def __enter__(self) -> "WorkdirLock":
        main = jax.process_index() == 0
        problem = None
        if main:
            try:
                self._acquire()
            except Exception as e:  # noqa: BLE001 - raised below, after the others have heard of it
                problem = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = multihost_utils.process_allgather(np.asarray(problem is None, np.int32))
            if problem is None and not np.all(ok):
                problem = WorkdirError(f"{self.shown} cannot be used (process 0 could not lock {self.file})")
            if problem is None and not main:
                self.path.mkdir(parents=True, exist_ok=True)
        if problem is not None:
            raise problem
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> None:
        existed, created = self.path.is_dir(), None
        for _ in range(3):  # retried only when the lock file was replaced while we were opening it
            try:
                created = _make_dirs(self.path) or created
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a file where the folder should be, no permission, ...
                raise WorkdirError(f"cannot use {self.shown} as the workdir: {e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # a file system without flock (some network mounts): train unguarded rather than not at all
                    log.warning("cannot lock %s (%s): a second run in this workdir would not be detected",
                                self.file, e)
                    return  # and a failed start removes nothing: another run may be writing here
                who = f"pid {holder[0]}" if holder else "pid unknown"
                if len(holder) > 1 and holder[1] != socket.gethostname():
                    who += f" on {holder[1]}"
                raise WorkdirError(f"{self.shown} is in use by another training run "
                                   f"({who}, holding {os.path.join(self.shown, self.NAME)})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # a failed start removed the folder after we opened its file: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            if existed or created is None:  # (None: another process made it meanwhile: not ours)
                self._before = set(os.listdir(self.path))
            else:  # this start made the workdir (`created`: the top-most folder it made for it)
                self._created, self._before = created, set()
            return
        raise WorkdirError(f"{self.shown} keeps being removed while this run starts")

    def started(self) -> None:
        """Training began: what this run created is its output from here on; discard_new does nothing."""
        self._before = None
        self._created = None

    def discard_new(self) -> None:
        """Removes what this start created in the workdir (call it, holding the lock, when a start
        fails): the workdir when this start made it (and the parent folders it made, while they are
        empty), or else the trainers' OUTPUTS it added to a workdir that existed. Nothing that was
        there before, nothing another program wrote beside them."""
        if self._before is None:
            return
        if self._created is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            parent = self.path.parent
            while self._created in (parent, *parent.parents):
                try:
                    parent.rmdir()  # only when empty: another run may have made a folder beside ours
                except OSError:
                    break
                parent = parent.parent
        else:
            for name in sorted((set(os.listdir(self.path)) & self.OUTPUTS) - self._before):
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        self.started()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None


def _make_dirs(path: Path) -> Path | None:
    """mkdir -p `path`; returns the top-most folder this call created (None: `path` existed)."""
    created = None
    for folder in reversed([path, *path.parents]):
        if folder.is_dir():
            continue
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        created = created or folder
    return created


class PreemptionGuard:
    """SIGTERM (the usual pre-emption / `scancel` / `kill` signal) -> a flag the loop polls. SIGHUP
    too: a run in a terminal that hangs up (an interactive SSH session dropped) saves the step
    reached and exits instead of dying with everything since the last checkpoint. So does a first
    Ctrl-C (SIGINT); it hands SIGINT back to the handler it had (Python's: KeyboardInterrupt), so a
    second Ctrl-C aborts at once without waiting for the save. A signal the process already ignores
    (SIGHUP under nohup, SIGINT of a background job) stays ignored.

    `should_stop(step)` is True once any process got the signal. With several processes the flags
    are combined by an all-gather every `sync_every` steps (all processes call it at the same
    steps, so they stop at the same step boundary); a single process checks every step.
    `received`: the first signal this process got (None: none, or a stop asked another way).
    """

    def __init__(self, sync_every: int = 10, signals=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
        self._flag = threading.Event()
        self.sync_every = max(1, int(sync_every))
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                if signal.getsignal(sig) is signal.SIG_IGN:  # nohup: the caller chose to ignore it
                    continue
                self._previous[sig] = signal.signal(sig, self._handler)
        else:  # signal handlers can only be installed from the main thread
            log.warning("PreemptionGuard created off the main thread: SIGTERM is not handled")

    def _handler(self, signum, frame):  # noqa: ARG002
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT, signal.default_int_handler))
            log.warning("interrupted (Ctrl-C): will checkpoint at the next step boundary and exit; "
                        "Ctrl-C again aborts without saving")
        else:
            log.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
        if self.received is None:
            self.received = signum
        self._flag.set()

    def stop_message(self, step: int) -> str:
        """What the loop says when it stops on the flag after saving `step`."""
        if self.received == signal.SIGINT:
            return f"interrupted: checkpoint of step {step} written; re-run the same command to resume"
        return f"pre-empted: checkpoint of step {step} written; re-run the same command to resume"

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
