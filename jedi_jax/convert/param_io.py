"""Strict orbax I/O for parameter trees, and atomic folder writes.

Orbax restores "as much as fits" when a target's shapes differ from what is stored; a model
loader must not. `restore_params` compares the stored tree (names, shapes) with the model's
expected tree first and raises `ConversionError` naming every difference.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jedi_jax.convert.torch_naming import ConversionError


def params_fingerprint(params, to_numpy=np.asarray) -> str:
    """sha256 over a parameter tree's paths, dtypes, shapes and bytes (independent of dict order):
    names exact weights, e.g. the VAE that encoded a latent cache, or the components that model
    folders must share to be averaged. `to_numpy(leaf)` gives a leaf's whole value on this host;
    it is called one leaf at a time, in path order (the same on every process), so a caller that
    gathers the shards of a multi-process array (models.frozen_fingerprints) holds one leaf at once."""
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        leaf = np.ascontiguousarray(to_numpy(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def save_params(path: str | os.PathLike, params: Mapping) -> None:
    """Writes `params` (nested dict of arrays) as an orbax checkpoint at `path` (must not exist).

    Orbax writes in background threads, which a Ctrl-C does not stop: were it raised while we wait,
    they would go on writing into `path` after the caller (atomic_directory) deleted it. So Ctrl-C
    is held until the write is over, then raised (interrupting `Thread.join` is itself unsafe before
    Python 3.12: the thread can be marked finished while it still runs). On an error, the
    checkpointer is closed, which waits for its threads, before the error propagates.
    """
    with _interrupts_deferred("the parameter write"):
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(os.path.abspath(path), params)
            checkpointer.wait_until_finished()
        except BaseException:
            _close_after_failure(checkpointer)
            raise
        checkpointer.close()


@contextlib.contextmanager
def _interrupts_deferred(what: str) -> Iterator[None]:
    """Holds SIGINT (Ctrl-C) while the block runs and delivers it when the block ends.

    Only in the main thread and only where SIGINT raises KeyboardInterrupt (Python's default);
    elsewhere a no-op.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []

    def hold(signum, frame):
        if not received:
            print(f"interrupted: finishing {what} first, then stopping", file=sys.stderr)
        received.append(frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _close_after_failure(checkpointer) -> None:
    """Closes an orbax checkpointer whose save failed: waits for its background threads (they would
    otherwise keep creating files). close() re-raises a background error once, before it has waited
    for everything, so it is called again; the caller re-raises the original error."""
    for _ in range(3):
        try:
            checkpointer.close()
            return
        except KeyboardInterrupt:
            continue  # only where SIGINT is not deferred: keep waiting for the writer
        except Exception:
            continue


def stored_shapes(path: str | os.PathLike) -> dict[str, tuple]:
    """{'a.0.kernel': shape} of an orbax params checkpoint, read from its metadata only."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f"no parameter checkpoint at {path}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
    except Exception as e:  # orbax raises assorted errors for damaged folders
        raise ConversionError(f"unreadable parameter checkpoint at {path}: {type(e).__name__}: {e}") from e
    finally:
        checkpointer.close()
    from jedi_jax.models.functional import flat_shapes

    return flat_shapes(tree)


def restore_params(path: str | os.PathLike, shapes: Mapping, *, what: str, shardings=None) -> dict:
    """Restores params whose structure and shapes must equal `shapes` (nested ShapeDtypeStruct).

    `shardings`, an optional tree of jax.sharding.Sharding matching `shapes`, places the arrays.
    """
    from jedi_jax.models.functional import flat_shapes, shape_problems

    problems = shape_problems(flat_shapes(shapes), stored_shapes(path))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{what}: checkpoint {path} does not match the model:\n  " + "\n  ".join(shown))
    if shardings is None:
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
    else:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(os.path.abspath(path), target)
    finally:
        checkpointer.close()


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False, marker: str | None = None) -> Path:
    """Absolute `dst`, if a folder may be written there: FileExistsError (one line) if it exists and
    `overwrite` is off, or if it is anything but a folder (a file is never replaced by a folder).

    With `overwrite` the old folder goes whole, so it is refused when it holds the current folder
    (`--out .` would move the user's working folder away), and, given a `marker` file name, when it
    is not empty and lacks that file: a tool that replaces its own previous output (the demo's
    grid.png, MiniBench's results.json) must not take a folder of other runs with it (`--out runs`)."""
    dst = Path(dst).absolute()
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (--overwrite replaces it; from Python, overwrite=True)")
        if dst.is_symlink():
            raise FileExistsError(f"{dst} is a symbolic link: refusing to replace it (give the folder it points to)")
        if not dst.is_dir():
            raise FileExistsError(f"{dst} exists and is not a folder: refusing to replace it with one")
        cwd = Path.cwd().resolve()
        if dst.resolve() == cwd or dst.resolve() in cwd.parents:
            raise FileExistsError(f"{dst} holds the current folder: refusing to replace it (give a new folder)")
        if marker is not None and any(dst.iterdir()) and not (dst / marker).exists():
            raise FileExistsError(f"{dst} is not empty and has no {marker}: it is not an earlier output of this "
                                  "tool, refusing to replace it (give a new or empty folder)")
    return dst


def _hidden_sibling(dst: Path, tag: str, *, create: bool) -> Path:
    """A new name `.{dst.name}.{tag}-XXXXXXXX` beside dst; created as a folder (honouring the umask,
    unlike tempfile.mkdtemp's 0700) if `create`."""
    for _ in range(100):
        path = dst.parent / f".{dst.name}.{tag}-{secrets.token_hex(4)}"
        if create:
            try:
                os.mkdir(path)  # mode 0o777 & ~umask, as any folder the user makes
            except FileExistsError:
                continue
            return path
        if not os.path.lexists(path):
            return path
    raise FileExistsError(f"no free name for a temporary folder beside {dst}")


def _discard(path: Path) -> None:
    """Deletes the folder that `dst` replaced. The new output is already in place, so a Ctrl-C here
    is held until the deletion is done, then re-raised; what cannot be deleted is named."""
    interrupted = None
    while True:
        try:
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            break
        except KeyboardInterrupt as e:
            interrupted = e
        except OSError:
            break
    if os.path.lexists(path):
        print(f"warning: could not delete the replaced folder, moved aside to {path}: delete it by hand",
              file=sys.stderr)
    if interrupted is not None:
        raise interrupted


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` (hidden, unique to this call, same ending, so writers
    that read the format from it still do) for the caller to write; renames it to `path` if the block
    succeeds and removes it otherwise: `path` is the old file or the new one, never half of one.
    Nested outside an atomic_directory block, the file is renamed after that folder, and only if it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yields a temporary folder beside `dst`; renames it to `dst` only if the block succeeds.

    Nothing half-written is left behind: on any error the temporary folder is removed. With
    `overwrite`, an existing `dst` is first moved aside to a hidden sibling, the new folder renamed
    into place, and only then the old one deleted: if the swap fails the old folder is put back, so
    `dst` is always either the complete old or the complete new folder. The folder gets the mode a
    plain mkdir gives (0o777 & ~umask).
    """
    dst = check_destination(dst, overwrite=overwrite, marker=marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(dst, "tmp", create=True)
    try:
        yield tmp
        check_destination(dst, overwrite=overwrite, marker=marker)  # again: something may have appeared meanwhile
        if not os.path.lexists(dst):
            os.rename(tmp, dst)
            return
        old = _hidden_sibling(dst, "old", create=False)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _discard(old)
