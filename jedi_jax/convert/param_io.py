"""Strict orbax I/O for parameter trees, and atomic folder writes.

Orbax restores "as much as fits" when a target's shapes differ from what is stored; a model
loader must not. `restore_params` compares the stored tree (names, shapes) with the model's
expected tree first and raises `ConversionError` naming every difference.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jedi_jax.convert.torch_naming import ConversionError, flatten


def _str_keys(tree: Mapping) -> dict[str, object]:
    return {".".join(str(p) for p in path): leaf for path, leaf in flatten(tree).items()}


def params_fingerprint(params) -> str:
    """sha256 over a parameter tree's paths, dtypes, shapes and bytes (independent of dict order):
    names exact weights, e.g. the VAE that encoded a latent cache, or the components that model
    folders must share to be averaged."""
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        leaf = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def save_params(path: str | os.PathLike, params: Mapping) -> None:
    """Writes `params` (nested dict of arrays) as an orbax checkpoint at `path` (must not exist)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), params)
    checkpointer.wait_until_finished()
    checkpointer.close()


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
    return {k: tuple(v.shape) for k, v in _str_keys(tree).items()}


def restore_params(path: str | os.PathLike, shapes: Mapping, *, what: str, shardings=None) -> dict:
    """Restores params whose structure and shapes must equal `shapes` (nested ShapeDtypeStruct).

    `shardings`, an optional tree of jax.sharding.Sharding matching `shapes`, places the arrays.
    """
    stored = stored_shapes(path)
    expected = {k: tuple(v.shape) for k, v in _str_keys(shapes).items()}
    problems = [f"missing parameter {k!r} (expected shape {s})" for k, s in expected.items() if k not in stored]
    problems += [f"unexpected parameter {k!r} (shape {s})" for k, s in stored.items() if k not in expected]
    problems += [
        f"parameter {k!r} has shape {stored[k]} but the model needs {s}"
        for k, s in expected.items()
        if k in stored and stored[k] != s
    ]
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


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `dst`; renames it to `dst` only if the block succeeds.

    Nothing half-written is left behind: on any error the temporary folder is removed.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

