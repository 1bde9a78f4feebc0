"""An in-memory pool of pre-rendered mini-world sets, built in parallel, for fast training.

Rendering a set on the fly costs ~3 ms of CPU; a GPU step of JeDi-mini consumes 64 sets in tens of
milliseconds, so the trainer would wait on the renderer. The pool renders `num_sets` sets once,
spread over all CPU cores (a 16-core machine renders 20k sets of 6 in seconds), optionally caches
them in an .npz file, and then serves records by index in microseconds. It is a random-access
source for `jedi_jax.train.loader.SetLoader` like any other:

    data.source = "jedi_jax.data.pool:from_config"          renders, pixels
    data.source = "jedi_jax.data.pool:latents_from_config"  renders encoded once by data.latent_vae (configs/mini.py)
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jedi_jax.data import mini_world as mw


# Caption wordings a pool may draw from. "world": the world's own captions (mini_world.TEMPLATES,
# as make_set writes them). "world+prompt": each caption re-drawn uniformly from TEMPLATES plus
# FULL_TEMPLATE, the wording MiniBench prompts in (a sentence the frozen random text encoder
# otherwise never shows the UNet; eval.prompt_probe measured what that costs). The renders, and
# the (background, placement) pairs, are the same: MiniBench's held-out pairs stay unseen.
# "world+prompt+place" adds PLACEMENT_ONLY: captions that name the placement but no background.
# Every background is rendered with only 2 of the 3 placements in training, so with placement and
# background always named together a model may learn placement as a property of the background
# (stage 3b of JeDi-mini: held-out pairs 0.19 placement, seen pairs 1.00). Here a quarter of the
# captions leave the background unsaid, so the placement word alone has to carry where the subject
# is. Each shares its words up to the placement with a full template, so with
# text_layer="embeddings" or "tokens" the placement token is the very vector the full sentence gives the UNet.
# Renders are untouched: the held-out (background, placement) pairs stay unseen.
PLACEMENT_ONLY = ("a photo of a {size} {orient} {cat} at the {place}", "a photo of a {size} {cat} at the {place}",
                  "a {cat} at the {place}")
# "placed" keeps only wordings that name the placement: the full templates that say it, plus
# PLACEMENT_ONLY. The world's background-only captions ("a ball on the beach") are what teach
# p(placement | background): with 2 of 3 placements per background in training, a caption that
# names only the background is, by the data, a statement that the subject is at one of those 2.
# Dropping them leaves the background word nothing to say about placement that the placement
# word in the same caption does not already say (3 of 8 captions name the placement alone).
_WORLD_AND_PROMPT = tuple(mw.TEMPLATES) + (mw.FULL_TEMPLATE,)
_PLACED = tuple(t for t in _WORLD_AND_PROMPT if "{place}" in t) + PLACEMENT_ONLY
WORDINGS = {"world": None, "world+prompt": _WORLD_AND_PROMPT, "world+prompt+place": _WORLD_AND_PROMPT + PLACEMENT_ONLY,
            "placed": _PLACED}
_WORDING_TAG = 17


def spawn_pool(processes: int):
    """The render pools' worker processes (RenderPool, vae_trainer.make_renders). Spawned, not
    forked: the trainer has started JAX threads, and forking a threaded process can deadlock. The
    workers ignore Ctrl-C: it reaches the whole foreground process group, and a worker killed
    mid-task would leave pool.map waiting forever, while the trainer's first Ctrl-C only asks for a
    stop at the next step boundary (PreemptionGuard); a second one interrupts the parent, whose pool
    context then terminates the workers."""
    return mp.get_context("spawn").Pool(processes, initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)

def _render_chunk(args):
    split, start, stop, n, num_subjects, wording = args  # set indices [start, stop) of the world
    templates = WORDINGS[wording]
    images = np.empty((stop - start, n, mw.RES, mw.RES, 3), np.uint8)
    masks = np.empty((stop - start, n, mw.RES, mw.RES), bool)
    captions, subjects = [], []
    for j, i in enumerate(range(start, stop)):
        s = mw.make_set(split, i, n=n, num_subjects=num_subjects)
        images[j], masks[j] = s["images"], s["masks"]
        if templates is None:
            captions.append(list(s["captions"]))
        else:  # own stream: the renders do not depend on the wording
            rng = np.random.default_rng([_WORDING_TAG, i])
            subject = mw.subject_from_name(s["subject"])
            captions.append([mw.caption(subject, ctx, template=templates[int(rng.integers(len(templates)))])
                             for ctx in s["contexts"]])
        subjects.append(s["subject"])
    return images, masks, captions, subjects


def write_cache(cache: str, **arrays) -> None:
    """np.savez to `cache` atomically. Every process of a multi-process run builds the same pool and
    may write it to the same shared path: each writes its own temporary file and renames it into
    place (the contents are equal; the last rename wins), so no reader sees a torn file and no
    writer renames another's half-written one."""
    tmp = f"{cache}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RenderPool:
    """Record j = mini_world.make_set(split, first_set + j, set_size) for j < num_sets, held in memory.

    first_set > 0 gives a pool of other subjects (with num_subjects=None every set index is a new
    subject): pools [0, 4000) and [4000, 8000) share no subject. Records also carry each render's
    subject mask (bool (R, 64, 64)), which train.subject_weight needs.
    """

    flip_safe = False  # mini-world renders: see set_source.MiniWorldSource

    def __init__(self, split: str = "train", num_sets: int = 20_000, set_size: int = 6, *,
                 num_subjects: int | None = None, processes: int | None = None, cache: str | None = None,
                 wording: str = "world", first_set: int = 0, log=print):
        if wording not in WORDINGS:
            raise ValueError(f"unknown caption wording {wording!r}; choose one of {sorted(WORDINGS)}")
        if first_set < 0:
            raise ValueError(f"first_set must be >= 0, got {first_set}")
        self.split, self.set_size, self.first_set = split, int(set_size), int(first_set)
        if cache and Path(cache).exists():
            data = np.load(cache, allow_pickle=False)
            held = str(data["wording"]) if "wording" in data else "world"
            held_first = int(data["first_set"]) if "first_set" in data else 0  # caches before first_set start at 0
            # -1 = a new subject per set (num_subjects None); caches written before the key held only those
            held_subjects = int(data["num_subjects"]) if "num_subjects" in data else -1
            want_subjects = int(num_subjects or -1)
            if (data["images"].shape[:2] != (num_sets, set_size) or str(data["split"]) != split or held != wording
                    or held_first != first_set or held_subjects != want_subjects):
                def subjects(n):
                    return "a new subject per set" if n < 0 else f"{n} subjects"
                raise ValueError(f"pool cache {cache} holds {data['images'].shape[:2]} sets from {held_first} of split "
                                 f"{data['split']} worded {held!r} with {subjects(held_subjects)}, not ({num_sets}, "
                                 f"{set_size}) from {first_set} of {split} worded {wording!r} with "
                                 f"{subjects(want_subjects)}: delete it")
            if "masks" not in data:  # renders are deterministic, so re-rendering keeps a latent cache valid
                raise ValueError(f"pool cache {cache} predates subject masks: delete it (it re-renders identically)")
            self.images, self.captions, self.subjects = data["images"], data["captions"], data["subjects"]
            self.masks = data["masks"]
            log(f"pool: loaded {num_sets} sets from {cache}")
            return
        start = time.time()
        processes = processes or os.cpu_count() or 1
        bounds = first_set + np.linspace(0, num_sets, min(num_sets, processes * 4) + 1).astype(int)
        chunks = [(split, int(a), int(b), set_size, num_subjects, wording) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if processes > 1:
            with spawn_pool(processes) as pool:
                parts = pool.map(_render_chunk, chunks)
        else:
            parts = [_render_chunk(c) for c in chunks]
        self.images = np.concatenate([p[0] for p in parts])  # (S, R, 64, 64, 3) uint8
        self.masks = np.concatenate([p[1] for p in parts])  # (S, R, 64, 64) bool, True = subject
        self.captions = np.array([c for p in parts for c in p[2]])  # (S, R) str
        self.subjects = np.array([s for p in parts for s in p[3]])  # (S,) str
        log(f"pool: rendered {num_sets} sets of {set_size} in {time.time() - start:.1f} s on {processes} processes "
            f"({self.images.nbytes / 2**30:.2f} GiB)")
        if cache:
            write_cache(cache, images=self.images, masks=self.masks, captions=self.captions, subjects=self.subjects,
                        split=split, wording=wording, first_set=first_set, num_subjects=int(num_subjects or -1))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {"images": self.images[i], "masks": self.masks[i], "captions": [str(c) for c in self.captions[i]],
                "subject": str(self.subjects[i])}


def from_config(data_cfg) -> RenderPool:
    """data.source hook: a pool of data.num_sets sets of data.source_set_size renders."""
    n = int(data_cfg.source_set_size) or int(data_cfg.set_size)
    num_subjects = int(data_cfg.num_subjects) or None
    cache = str(data_cfg.get("pool_cache", "") or "") or None
    return RenderPool(str(data_cfg.split), int(data_cfg.num_sets), n, num_subjects=num_subjects, cache=cache,
                      wording=str(data_cfg.get("caption_wording", "world")),
                      first_set=int(data_cfg.get("first_set", 0)))


def renders_fingerprint(images: np.ndarray) -> str:
    """sha256 of a pool's render bytes (shape included): names the exact images a latent cache encodes."""
    h = hashlib.sha256(f"{images.dtype}:{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


class LatentPool:
    """A RenderPool encoded once by a frozen VAE: records carry 'latents' (R, h, w, C), scaled for the
    UNet (`scale_latents` of the posterior mean), instead of pixels. Encoding the pool once removes
    the VAE encoder from every training step (on CPUs it is a large share of a small model's step)."""

    flip_safe = False  # mini-world renders: see set_source.MiniWorldSource

    def __init__(self, renders: RenderPool, vae_folder: str, *, batch: int = 256, cache: str | None = None,
                 log=print, progress: bool = True):
        import jax

        from jedi_jax.convert.param_io import params_fingerprint
        from jedi_jax.loading import load_component
        from jedi_jax.models.vae import scale_latents

        self.captions, self.subjects, self.masks = renders.captions, renders.subjects, renders.masks
        vae = load_component(vae_folder, "vae")
        fingerprint = params_fingerprint(vae.params)
        images_fp = renders_fingerprint(renders.images)
        if cache and Path(cache).exists():
            # strict: latents of other renders or of another VAE would train silently on wrong targets
            data = np.load(cache, allow_pickle=False)
            held = str(data["vae"]) if "vae" in data else "none recorded"
            held_images = str(data["renders"]) if "renders" in data else "none recorded"
            if held != fingerprint or held_images != images_fp:
                raise ValueError(f"latent cache {cache} holds renders {held_images[:12]} encoded by VAE {held[:12]}, "
                                 f"not renders {images_fp[:12]} encoded by {vae_folder}'s VAE {fingerprint[:12]}: "
                                 "delete it")
            self.latents = data["latents"]
            log(f"pool: loaded latents {self.latents.shape} from {cache}")
            return
        encode = jax.jit(lambda p, x: scale_latents(vae.functional.bind(p).encode(x)[0], vae.config))
        flat = renders.images.reshape((-1,) + renders.images.shape[2:])  # (S*R, 64, 64, 3) uint8
        start, out = time.time(), []
        # minutes on 2 CPU cores for a few thousand sets: show progress (stderr, like the sampler's bar)
        for i in tqdm(range(0, flat.shape[0], batch), desc="pool: encoding renders", unit="batch",
                      mininterval=10, disable=not progress):
            x = flat[i:i + batch].astype(np.float32) / 127.5 - 1.0
            if x.shape[0] < batch:  # one compiled shape
                x = np.concatenate([x, np.zeros((batch - x.shape[0],) + x.shape[1:], np.float32)])
            out.append(np.asarray(encode(vae.params, x))[: min(batch, flat.shape[0] - i)])
        latents = np.concatenate(out)
        self.latents = latents.reshape(renders.images.shape[:2] + latents.shape[1:])  # (S, R, h, w, C)
        log(f"pool: encoded {flat.shape[0]} renders with {vae_folder} in {time.time() - start:.1f} s")
        if cache:
            write_cache(cache, latents=self.latents, vae=fingerprint, renders=images_fp)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, i: int) -> dict:
        # masks stay at render resolution: the loss pools them to the latent grid (train/step.py)
        return {"latents": self.latents[i], "masks": self.masks[i], "captions": [str(c) for c in self.captions[i]],
                "subject": str(self.subjects[i])}


def latents_from_config(data_cfg) -> LatentPool:
    """data.source hook: from_config's pool, encoded by the VAE of data.latent_vae (a model folder)."""
    if not str(data_cfg.latent_vae):
        raise ValueError("data.source=jedi_jax.data.pool:latents_from_config needs data.latent_vae (a model folder)")
    renders = from_config(data_cfg)
    cache = str(data_cfg.get("pool_cache", "") or "")
    return LatentPool(renders, str(data_cfg.latent_vae), cache=f"{cache}.latents.npz" if cache else None)
