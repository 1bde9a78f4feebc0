"""Builds the training input pipeline from the config's `data` section.

The loader itself is `jedi_jax.train.loader.SetLoader` (deterministic, process-sharded,
checkpointable); this module only picks the random-access SOURCE of set records and the
tokenizer:

    data.source = "mini_world"            the procedural mini world (jedi_jax.data.mini_world),
                                          rendered on the fly: data.split, data.num_sets sets of
                                          data.source_set_size renders each, from set data.first_set
    data.source = "array_record:PATH"     a built set data set (jedi_jax.data.set_source; PATH = a TFDS
                                          version folder or an .array_record file), split data.split
    data.source = "module.path:factory"   any callable(data_config) -> random-access source
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np


def array_record_path(data_cfg) -> str | None:
    """PATH of `data.source = "array_record:PATH"`, None for any other source."""
    src = str(data_cfg.source)
    return src.split(":", 1)[1] if src.startswith("array_record:") else None


def renders_mini_world(data_cfg) -> bool:
    """Whether `data.source` holds mini-world renders (`mini_world`, the jedi_jax.data.pool factories,
    or array_record data written from the mini world): such sources must not be mirrored (their
    `flip_safe = False`), checked before anything is built."""
    src = str(data_cfg.source)
    if (path := array_record_path(data_cfg)) is not None:
        from jedi_jax.data.set_source import path_flip_safe

        return not path_flip_safe(path)
    return src == "mini_world" or src.startswith("jedi_jax.data.pool:")


def make_source(data_cfg, with_masks: bool = False) -> Any:
    """with_masks: records carry subject masks (mini_world; other sources carry them if their data has them)."""
    src = str(data_cfg.source)
    if src == "mini_world":
        from jedi_jax.data.set_source import MiniWorldSource

        n = int(data_cfg.source_set_size) or int(data_cfg.set_size)
        return MiniWorldSource(data_cfg.split, int(data_cfg.num_sets), n, int(data_cfg.num_subjects) or None,
                               with_masks=with_masks, first_set=int(data_cfg.get("first_set", 0)))
    if (path := array_record_path(data_cfg)) is not None:
        from jedi_jax.data.set_source import ArrayRecordSetSource

        return ArrayRecordSetSource(path, split=str(data_cfg.split))
    if ":" in src and not src.startswith("/"):
        module, attr = src.split(":", 1)
        return getattr(importlib.import_module(module), attr)(data_cfg)
    raise ValueError(f"data.source={src!r}: use 'mini_world', 'array_record:PATH' or 'module:factory' "
                     "(real-image set data sets are built by jedi_jax.data, see README)")


def make_loader(data_cfg, *, tokenize_fn: Callable[[list[str]], np.ndarray] | None, seed: int,
                process_index: int, process_count: int, with_masks: bool = False):
    """SetLoader for this process (its slice of each global batch); with_masks: batches carry the
    subject masks (for train.subject_weight), and a source without them is an error."""
    from jedi_jax.train.loader import SetLoader

    return SetLoader(
        make_source(data_cfg, with_masks),
        batch_size=int(data_cfg.batch_size),
        set_size=int(data_cfg.set_size),
        image_size=int(data_cfg.image_size),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        tokenize_fn=tokenize_fn,
        max_ref=None if int(data_cfg.max_ref) < 0 else int(data_cfg.max_ref),
        caption_dropout=float(data_cfg.caption_dropout),
        ref_dropout=float(data_cfg.ref_dropout),
        hflip=float(data_cfg.hflip),
        flip_mode=str(data_cfg.flip_mode),
        flip_swap_words=tuple(tuple(p) for p in data_cfg.flip_swap_words),
        crop_scale=tuple(data_cfg.crop_scale),
        crop_ratio=tuple(data_cfg.crop_ratio),
        resample=str(data_cfg.resample),
        with_masks=with_masks,
        num_workers=int(data_cfg.num_workers),
        prefetch=int(data_cfg.prefetch),
    )
