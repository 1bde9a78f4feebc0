"""An in-memory pool of pre-rendered mini-world sets, built in parallel, for fast training.

Rendering a set on the fly costs ~3 ms of CPU; a GPU step of JeDi-mini consumes 64 sets in tens of
milliseconds, so the trainer would wait on the renderer. The pool renders `num_sets` sets once,
spread over all CPU cores (a 16-core machine renders 20k sets of 6 in seconds), optionally caches
them in an .npz file, and then serves records by index in microseconds. It is a random-access
source for `jedi_jax.train.loader.SetLoader` like any other:

    data.source = "jedi_jax.data.pool:from_config"     (configs/mini.py)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from jedi_jax.data import mini_world as mw


def _render_chunk(args):
    split, start, stop, n, num_subjects = args
    images = np.empty((stop - start, n, mw.RES, mw.RES, 3), np.uint8)
    captions, subjects = [], []
    for j, i in enumerate(range(start, stop)):
        s = mw.make_set(split, i, n=n, num_subjects=num_subjects)
        images[j] = s["images"]
        captions.append(list(s["captions"]))
        subjects.append(s["subject"])
    return images, captions, subjects


class RenderPool:
    """Records i = mini_world.make_set(split, i, set_size) for i < num_sets, held in memory."""

    def __init__(self, split: str = "train", num_sets: int = 20_000, set_size: int = 6, *,
                 num_subjects: int | None = None, processes: int | None = None, cache: str | None = None,
                 log=print):
        self.split, self.set_size = split, int(set_size)
        if cache and Path(cache).exists():
            data = np.load(cache, allow_pickle=False)
            if data["images"].shape[:2] != (num_sets, set_size) or str(data["split"]) != split:
                raise ValueError(f"pool cache {cache} holds {data['images'].shape[:2]} sets of split "
                                 f"{data['split']}, not ({num_sets}, {set_size}) of {split}: delete it")
            self.images, self.captions, self.subjects = data["images"], data["captions"], data["subjects"]
            log(f"pool: loaded {num_sets} sets from {cache}")
            return
        start = time.time()
        processes = processes or os.cpu_count() or 1
        bounds = np.linspace(0, num_sets, min(num_sets, processes * 4) + 1).astype(int)
        chunks = [(split, int(a), int(b), set_size, num_subjects) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if processes > 1:
            with mp.get_context("fork").Pool(processes) as pool:
                parts = pool.map(_render_chunk, chunks)
        else:
            parts = [_render_chunk(c) for c in chunks]
        self.images = np.concatenate([p[0] for p in parts])  # (S, R, 64, 64, 3) uint8
        self.captions = np.array([c for p in parts for c in p[1]])  # (S, R) str
        self.subjects = np.array([s for p in parts for s in p[2]])  # (S,) str
        log(f"pool: rendered {num_sets} sets of {set_size} in {time.time() - start:.1f} s on {processes} processes "
            f"({self.images.nbytes / 2**30:.2f} GiB)")
        if cache:
            tmp = f"{cache}.tmp.npz"
            np.savez(tmp, images=self.images, captions=self.captions, subjects=self.subjects, split=split)
            os.replace(tmp, cache)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], "captions": [str(c) for c in self.captions[i]], "subject": str(self.subjects[i])}


def from_config(data_cfg) -> RenderPool:
    """data.source hook: a pool of data.num_sets sets of data.source_set_size renders."""
    n = int(data_cfg.source_set_size) or int(data_cfg.set_size)
    num_subjects = int(data_cfg.num_subjects) or None
    cache = str(data_cfg.get("pool_cache", "") or "") or None
    return RenderPool(str(data_cfg.split), int(data_cfg.num_sets), n, num_subjects=num_subjects, cache=cache)
