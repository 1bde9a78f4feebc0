"""Training input pipeline for JeDi: batches of image SETS with random references (JeDi, Sec. 3-4).

A source is any random-access collection (``len(source)``, ``source[i]``) whose records are dicts::

    {'images':   uint8 (n, H, W, 3),       # n varies per set, H/W may vary per set
     'captions': list[str] of length n,
     'masks':    bool (n, H, W),           # optional subject masks (nonzero = subject)
     'subject':  str}

`SetLoader` turns it into an endless (or ``num_epochs``-long) iterator of NumPy batches::

    'images'      float32 (B_local, N, S, S, 3)   in [-1, 1]; padding members are 0
    'input_ids'   int32   (B_local, N, T)          tokenize_fn(captions); dropped/padded captions are ""
    'member_mask' bool    (B_local, N)             True = real member (False = padding)
    'ref_mask'    bool    (B_local, N)             True = reference (known) member; subset of member_mask
    'masks'       float32 (B_local, N, S, S)       in [0, 1]; only with with_masks (latent records too, at S)
    'set_mask'    bool    (B_local,)               False only for padding sets (drop_remainder=False)
    'set_index'   int32   (B_local,)               source index of each set, -1 for padding sets

with B_local = batch_size // process_count, N = set_size, S = image_size.

Per set (all random choices from one NumPy Generator seeded by (seed, epoch, position)):
  1. members: min(n, N) of the n images are drawn without replacement, in random order, into slots
     0..valid-1; slots valid..N-1 are padding (member_mask False).
  2. references: with probability ``ref_dropout`` k = 0, otherwise k ~ U{0, ..., min(max_ref, valid-1)};
     k random valid members become references, so at least one valid member is always generated.
  3. captions: each member's caption independently becomes "" with probability ``caption_dropout``.
  4. augmentation per member: random-resized crop (torchvision semantics: area fraction in
     ``crop_scale``, aspect ratio w/h log-uniform in ``crop_ratio``, centre-crop fallback), resize to
     S x S, horizontal flip with probability ``hflip`` (``flip_mode="member"``: independently per
     member; ``"set"``: one draw for the whole set, keeping chiral identity cues consistent within a
     set). A flipped member's caption swaps the words of ``flip_swap_words`` ("left" <-> "right").
     The subject mask gets exactly the same crop, resampling filter and flip (it is resampled as an
     8-bit image, then scaled to [0, 1]).

Ordering and sharding: epoch e visits ``epoch_permutation(len(source), seed, e)``. Global step s of
an epoch covers permutation positions [s*B, (s+1)*B); process p takes the contiguous slice
[s*B + p*B_local, s*B + (p+1)*B_local). The processes are disjoint and together cover the epoch, and
since every random choice is keyed by the global position, the concatenation of all processes'
batches at a step equals the single-process batch: a batch depends only on (seed, step, config),
not on process count, thread count or timing.

Checkpointing: ``get_state()`` returns ``{'epoch', 'position', 'seed', 'num_sets'}`` (JSON-able;
``position`` = global permutation position of the next batch); ``set_state`` on a fresh loader
continues with exactly the same batches, even under a different process count.
No TensorFlow; optional worker threads (PIL releases the GIL while resampling).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

__all__ = ["SetLoader", "AugmentConfig", "epoch_permutation", "process_set", "random_resized_crop_box", "swap_words"]

_PERM_SALT = 0x9E3779B1  # separates the permutation stream from the per-example streams
_EXAMPLE_SALT = 0x85EBCA6B

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def epoch_permutation(num_sets: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of epoch ``epoch``: int64 (num_sets,), a permutation of range(num_sets)."""
    if not shuffle:
        return np.arange(num_sets, dtype=np.int64)
    rng = np.random.default_rng([_PERM_SALT, int(seed), int(epoch)])
    return rng.permutation(num_sets).astype(np.int64)


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The Generator for the set at global permutation position ``position`` of epoch ``epoch``."""
    return np.random.default_rng([_EXAMPLE_SALT, int(seed), int(epoch), int(position)])


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-set sampling and augmentation settings (see module docstring)."""
    set_size: int
    image_size: int
    max_ref: int
    caption_dropout: float = 0.1
    ref_dropout: float = 0.1
    hflip: float = 0.5
    flip_mode: str = "member"
    flip_swap_words: tuple[tuple[str, str], ...] = (("left", "right"),)
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    resample: str = "bilinear"
    with_masks: bool = False


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: returns (top, left, crop_h, crop_w) in pixels.

    Tries 10 times to sample an area fraction in ``scale`` and aspect ratio (w/h) log-uniform in
    ``ratio`` that fits; otherwise a centre crop with the aspect ratio clamped to ``ratio``.
    Always draws exactly 10 x 4 uniforms so the stream position does not depend on the image size.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = rng.random((10, 4))
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[t, 0])
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[t, 1])
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[t, 2] * (height - h + 1)), height - h)
            left = min(int(u[t, 3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _transform(img: np.ndarray, box: tuple[int, int, int, int], flip: bool, size: int, resample) -> np.ndarray:
    """Crop ``box`` (top, left, h, w) from uint8 (H, W[, C]), resize to (size, size), optionally flip."""
    top, left, h, w = box
    out = Image.fromarray(np.ascontiguousarray(img)).resize(
        (size, size), resample, box=(left, top, left + w, top + h))
    out = np.asarray(out)
    return out[:, ::-1] if flip else out


def swap_words(caption: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Swap whole words of each pair (case-insensitive, first-letter case kept): the caption of a
    horizontally flipped image ("a cup at the left" -> "a cup at the right")."""
    if not pairs or not caption:
        return caption
    table = {}
    for a, b in pairs:
        table[a.lower()], table[b.lower()] = b.lower(), a.lower()
    pattern = r"\b(" + "|".join(re.escape(w) for w in table) + r")\b"

    def sub(m: re.Match) -> str:
        w = table[m.group(0).lower()]
        return w[:1].upper() + w[1:] if m.group(0)[:1].isupper() else w

    return re.sub(pattern, sub, caption, flags=re.IGNORECASE)


def _draw_members(n: int, rng: np.random.Generator, cfg: AugmentConfig):
    """Which of the n renders fill the N slots, which are references, which captions stay."""
    N = cfg.set_size
    valid = min(n, N)
    members = rng.choice(n, size=valid, replace=False)
    drop_refs = rng.random() < cfg.ref_dropout
    k_max = max(0, min(cfg.max_ref, valid - 1))
    k = int(rng.integers(0, k_max + 1))
    if drop_refs:
        k = 0
    refs = rng.choice(valid, size=k, replace=False)
    keep_caption = rng.random(N) >= cfg.caption_dropout
    member_mask = np.arange(N) < valid
    ref_mask = np.zeros(N, bool)
    ref_mask[refs] = True
    return members, member_mask, ref_mask, keep_caption


def _process_latent_set(record: Mapping[str, Any], rng: np.random.Generator, cfg: AugmentConfig) -> dict:
    """A record with precomputed 'latents' float32 (n, h, w, C) (already scaled for the UNet)."""
    if cfg.hflip > 0 or tuple(cfg.crop_scale) != (1.0, 1.0):
        raise ValueError("precomputed latents cannot be flipped or cropped: set hflip=0, crop_scale=(1, 1)")
    latents = np.asarray(record["latents"], np.float32)
    captions = list(record["captions"])
    if latents.ndim != 4 or len(captions) != latents.shape[0]:
        raise ValueError(f"'latents' must be (n, h, w, C) with n captions, got {latents.shape}, {len(captions)}")
    if latents.shape[0] == 0:
        raise ValueError(f"empty set (subject {record.get('subject')!r})")
    members, member_mask, ref_mask, keep_caption = _draw_members(latents.shape[0], rng, cfg)
    out = np.zeros((cfg.set_size,) + latents.shape[1:], np.float32)
    out[: len(members)] = latents[members]
    out_captions = [captions[m] if keep_caption[slot] else "" for slot, m in enumerate(members)]
    out_captions += [""] * (cfg.set_size - len(members))
    ex = {"latents": out, "captions": out_captions, "member_mask": member_mask, "ref_mask": ref_mask}
    if cfg.with_masks:  # kept at render resolution (S, S): the loss pools them to the latent grid
        masks = np.asarray(record["masks"]) if "masks" in record else None
        if masks is None or masks.shape != (latents.shape[0], cfg.image_size, cfg.image_size):
            raise ValueError(f"loader was configured with masks: a latent record needs 'masks' "
                             f"({latents.shape[0]}, {cfg.image_size}, {cfg.image_size}), got "
                             f"{None if masks is None else masks.shape}")
        ex["masks"] = np.zeros((cfg.set_size, cfg.image_size, cfg.image_size), np.uint8)
        ex["masks"][: len(members)] = (masks[members] != 0).astype(np.uint8) * 255
    return ex


def process_set(record: Mapping[str, Any], rng: np.random.Generator, cfg: AugmentConfig) -> dict:
    """One source record -> one set of the batch (uint8, not yet normalized).

    Returns {'images': uint8 (N, S, S, 3), 'masks': uint8 (N, S, S) (if cfg.with_masks, 255 = subject),
    'captions': list[str] (N), 'member_mask': bool (N,), 'ref_mask': bool (N,)}.
    The draw order is fixed: members, ref dropout, k, which refs, caption dropout, flips, then per
    member the crop -- so results depend only on the record and the Generator's seed.
    """
    if "latents" in record:  # precomputed VAE latents: the same draws, no pixel augmentation
        return _process_latent_set(record, rng, cfg)
    images = np.asarray(record["images"])
    captions = list(record["captions"])
    n = images.shape[0]
    if n == 0:
        raise ValueError(f"empty set (subject {record.get('subject')!r})")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"'images' must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    if len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    masks = None
    if cfg.with_masks:
        if "masks" not in record:
            raise ValueError("loader was configured with masks but a record has no 'masks'")
        masks = np.asarray(record["masks"])
        if masks.shape != images.shape[:3]:
            raise ValueError(f"'masks' {masks.shape} does not match images {images.shape[:3]}")

    N, S = cfg.set_size, cfg.image_size
    members, member_mask, ref_mask, keep_caption = _draw_members(n, rng, cfg)
    flip_u, set_flip_u = rng.random(N), rng.random()
    flips = np.full(N, set_flip_u < cfg.hflip) if cfg.flip_mode == "set" else flip_u < cfg.hflip
    out_images = np.zeros((N, S, S, 3), np.uint8)
    out_masks = np.zeros((N, S, S), np.uint8) if cfg.with_masks else None
    out_captions = [""] * N
    resample = _RESAMPLE[cfg.resample]
    for slot, m in enumerate(members):
        flip = bool(flips[slot])
        box = random_resized_crop_box(rng, images.shape[1], images.shape[2], cfg.crop_scale, cfg.crop_ratio)
        out_images[slot] = _transform(images[m], box, flip, S, resample)
        if out_masks is not None:
            out_masks[slot] = _transform(np.asarray(masks[m], bool).astype(np.uint8) * 255, box, flip, S, resample)
        if keep_caption[slot]:
            out_captions[slot] = swap_words(captions[m], cfg.flip_swap_words) if flip else captions[m]
    return {"images": out_images, "masks": out_masks, "captions": out_captions,
            "member_mask": member_mask, "ref_mask": ref_mask}


class SetLoader:
    """Deterministic, shardable, checkpointable iterator of set batches (see module docstring).

    Args:
      source: random-access source (``len``, ``__getitem__``) of set records.
      batch_size: GLOBAL number of sets per step; must be divisible by ``process_count``.
      set_size: N, members per set.
      image_size: S, output side length.
      seed: base seed of every random choice.
      process_index, process_count: this process's shard (e.g. jax.process_index()/process_count()).
      tokenize_fn: callable list[str] -> int array (len, T), deterministic (it is called once per
        distinct caption of a batch). If None, the batch carries
        'captions' (a NumPy str array (B_local, N)) instead of 'input_ids'.
      max_ref: largest number of references (default N-1).
      caption_dropout: per-member probability of replacing the caption with "".
      ref_dropout: per-set probability of k = 0 (all members generated).
      hflip: horizontal flip probability; flip_mode: "member" (independent per member) or "set"
        (one draw per set); flip_swap_words: word pairs swapped in flipped members' captions.
      crop_scale, crop_ratio: random-resized-crop area fraction and w/h ratio ranges; the default
        ((1, 1), (1, 1)) is no crop for square images, the centre largest square otherwise.
      resample: "bilinear" | "bicubic" | "lanczos" | "nearest" (images and masks alike).
      drop_remainder: drop the last partial batch of each epoch; otherwise it is filled with padding
        sets (set_mask False, member_mask all False).
      shuffle: shuffle each epoch (permutation seeded by (seed, epoch)).
      num_epochs: stop after this many epochs (None = forever).
      with_masks: emit 'masks'; None = auto (whether ``source[0]`` has 'masks').
      num_workers: worker threads (0 = synchronous); prefetch: batches queued ahead when threaded.
    """

    def __init__(self, source: Any, *, batch_size: int, set_size: int, image_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1,
                 tokenize_fn: Callable[[list[str]], np.ndarray] | None = None,
                 max_ref: int | None = None, caption_dropout: float = 0.1, ref_dropout: float = 0.1,
                 hflip: float = 0.5, flip_mode: str = "member",
                 flip_swap_words: Sequence[Sequence[str]] = (("left", "right"),),
                 crop_scale: Sequence[float] = (1.0, 1.0),
                 crop_ratio: Sequence[float] = (1.0, 1.0), resample: str = "bilinear",
                 drop_remainder: bool = True, shuffle: bool = True, num_epochs: int | None = None,
                 with_masks: bool | None = None, num_workers: int = 0, prefetch: int = 2):
        if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if set_size < 1 or image_size < 1:
            raise ValueError("set_size and image_size must be >= 1")
        if flip_mode not in ("member", "set"):
            raise ValueError(f"flip_mode must be 'member' or 'set', got {flip_mode!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}")
        if not (0 < crop_scale[0] <= crop_scale[1] and 0 < crop_ratio[0] <= crop_ratio[1]):
            raise ValueError(f"bad crop_scale {crop_scale} / crop_ratio {crop_ratio}")
        for name, p in (("caption_dropout", caption_dropout), ("ref_dropout", ref_dropout), ("hflip", hflip)):
            if not 0.0 <= p <= 1.0:  # NaN fails too
                raise ValueError(f"{name}={p} must be a probability in [0, 1]")
        if int(seed) < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        if hflip > 0 and getattr(source, "flip_safe", True) is False:
            raise ValueError(f"hflip={hflip}: {type(source).__name__} must not be mirrored (a mirrored train "
                             "render of (background, left) shows a held-out (background, right) pair, and "
                             "subjects carry chiral marks): set data.hflip=0")
        if (tuple(crop_scale), tuple(crop_ratio)) != ((1.0, 1.0), (1.0, 1.0)) and getattr(source, "flip_safe", True) is False:
            # the same reason: a crop moves the subject (the left part of a centre render shows it at the right)
            raise ValueError(f"crop_scale={tuple(crop_scale)} / crop_ratio={tuple(crop_ratio)}: {type(source).__name__} "
                             "must not be cropped (a crop moves the subject into a held-out placement under its "
                             "old caption): set data.crop_scale and data.crop_ratio to (1, 1)")
        self.source = source
        self.num_sets = len(source)
        if self.num_sets == 0:
            raise ValueError("empty source")
        if drop_remainder and self.num_sets < batch_size:
            raise ValueError(f"source has {self.num_sets} sets < batch_size {batch_size} with drop_remainder")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed = int(seed)
        self.tokenize_fn = tokenize_fn
        self.drop_remainder, self.shuffle, self.num_epochs = drop_remainder, shuffle, num_epochs
        first = source[0]
        if with_masks is None:
            with_masks = "masks" in first
        # Latent or pixel records, decided once: a process whose slot range is all padding (the last
        # partial batch, drop_remainder=False) must still emit the same keys and shapes as the others.
        self._latent_shape = np.asarray(first["latents"]).shape[1:] if "latents" in first else None
        self.cfg = AugmentConfig(
            set_size=set_size, image_size=image_size,
            max_ref=set_size - 1 if max_ref is None else int(max_ref),
            caption_dropout=float(caption_dropout), ref_dropout=float(ref_dropout), hflip=float(hflip),
            flip_mode=flip_mode, flip_swap_words=tuple((str(a), str(b)) for a, b in flip_swap_words),
            crop_scale=(float(crop_scale[0]), float(crop_scale[1])),
            crop_ratio=(float(crop_ratio[0]), float(crop_ratio[1])), resample=resample,
            with_masks=bool(with_masks))
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._pool = cf.ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._prefetch = max(1, prefetch)
        self._queue: collections.deque = collections.deque()  # ((epoch, position), [futures | None])
        self._epoch, self._position = 0, 0

    # ---- epoch / step arithmetic -------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.num_sets // self.batch_size
        return -(-self.num_sets // self.batch_size)

    def _normalize(self, epoch: int, position: int) -> tuple[int, int]:
        """Move a position past the last (full, if drop_remainder) batch to the next epoch."""
        limit = self.num_sets - self.batch_size if self.drop_remainder else self.num_sets - 1
        if position > limit:
            return epoch + 1, 0
        return epoch, position

    def _advance(self, epoch: int, position: int) -> tuple[int, int]:
        return self._normalize(epoch, position + self.batch_size)

    def state_for_step(self, step: int) -> dict:
        """The state whose next batch is global step ``step`` (counting from epoch 0, position 0)."""
        epoch, s = divmod(int(step), self.steps_per_epoch)
        return {"epoch": epoch, "position": s * self.batch_size, "seed": self.seed, "num_sets": self.num_sets}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = epoch_permutation(self.num_sets, self.seed, epoch, self.shuffle)
            while len(self._perms) > 3:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    # ---- batch construction ------------------------------------------------------------------
    def _local_positions(self, position: int) -> range:
        start = position + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def _load(self, epoch: int, position: int, index: int) -> dict:
        return process_set(self.source[int(index)], example_rng(self.seed, epoch, position), self.cfg)

    def _jobs(self, epoch: int, position: int) -> list:
        """Per local slot: a result, a Future (threaded) or None (padding set)."""
        perm = self._perm(epoch)
        jobs = []
        for pos in self._local_positions(position):
            if pos >= self.num_sets:
                jobs.append(None)
            elif self._pool is not None:
                jobs.append(self._pool.submit(self._load, epoch, pos, perm[pos]))
            else:
                jobs.append(self._load(epoch, pos, perm[pos]))
        return jobs

    def _assemble(self, epoch: int, position: int, jobs: list) -> dict[str, np.ndarray]:
        N, S, B = self.cfg.set_size, self.cfg.image_size, self.local_batch_size
        results = [None if j is None else (j.result() if isinstance(j, cf.Future) else j) for j in jobs]
        pixel = self._latent_shape is None
        images = np.zeros((B, N, S, S, 3), np.uint8) if pixel else np.zeros((B, N) + self._latent_shape, np.float32)
        for ex in results:
            if ex is not None and ("latents" in ex) == pixel:
                raise ValueError("the source mixes records with and without precomputed 'latents'")
        masks = np.zeros((B, N, S, S), np.uint8) if self.cfg.with_masks else None
        member_mask = np.zeros((B, N), bool)
        ref_mask = np.zeros((B, N), bool)
        set_mask = np.zeros((B,), bool)
        set_index = np.full((B,), -1, np.int32)
        captions = [""] * (B * N)
        perm = self._perm(epoch)
        for b, (pos, ex) in enumerate(zip(self._local_positions(position), results)):
            if ex is None:
                continue
            images[b] = ex["images"] if pixel else ex["latents"]
            if masks is not None:
                masks[b] = ex["masks"]
            member_mask[b], ref_mask[b] = ex["member_mask"], ex["ref_mask"]
            set_mask[b], set_index[b] = True, perm[pos]
            captions[b * N:(b + 1) * N] = ex["captions"]
        if pixel:
            images = images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
        images[~member_mask] = 0.0
        batch = {"images" if pixel else "latents": images,
                 "member_mask": member_mask, "ref_mask": ref_mask,
                 "set_mask": set_mask, "set_index": set_index}
        if masks is not None:
            batch["masks"] = masks.astype(np.float32) * np.float32(1 / 255)
        if self.tokenize_fn is not None:
            unique = list(dict.fromkeys(captions))  # tokenize each distinct caption once ("" repeats)
            ids = np.asarray(self.tokenize_fn(unique))
            if ids.ndim != 2 or ids.shape[0] != len(unique):
                raise ValueError(f"tokenize_fn returned {ids.shape}, expected ({len(unique)}, T)")
            row = {c: r for r, c in enumerate(unique)}
            batch["input_ids"] = ids.astype(np.int32)[[row[c] for c in captions]].reshape(B, N, -1)
        else:
            batch["captions"] = np.array(captions, dtype=str).reshape(B, N)
        return batch

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This process's batch starting at global permutation ``position`` of ``epoch`` (stateless)."""
        return self._assemble(epoch, position, self._jobs(epoch, position))

    def batch_for_step(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step ``step`` (stateless)."""
        st = self.state_for_step(step)
        return self.batch_at(st["epoch"], st["position"])

    # ---- iterator protocol -------------------------------------------------------------------
    def __iter__(self) -> "SetLoader":
        return self

    def _finished(self, epoch: int) -> bool:
        return self.num_epochs is not None and epoch >= self.num_epochs

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finished(self._epoch):
            raise StopIteration
        if self._pool is None:
            batch = self.batch_at(self._epoch, self._position)
        else:
            key = self._queue[-1][0] if self._queue else None
            nxt = (self._epoch, self._position) if key is None else self._advance(*key)
            while len(self._queue) < self._prefetch + 1 and not self._finished(nxt[0]):
                self._queue.append((nxt, self._jobs(*nxt)))
                nxt = self._advance(*nxt)
            (epoch, position), jobs = self._queue.popleft()
            if (epoch, position) != (self._epoch, self._position):
                raise RuntimeError(f"loader queue at {(epoch, position)} but the loader is at "
                                   f"{(self._epoch, self._position)}")
            try:
                batch = self._assemble(epoch, position, jobs)
            except BaseException:
                self._cancel_queue()  # the position has not moved: the next call rebuilds this batch
                raise
        self._epoch, self._position = self._advance(self._epoch, self._position)
        return batch

    def get_state(self) -> dict:
        """JSON-able position of the NEXT batch: {'epoch', 'position', 'seed', 'num_sets'}."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed, "num_sets": self.num_sets}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume from ``get_state()`` output; the following batches equal the original run's."""
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, loader has seed {self.seed}")
        if "num_sets" in state and int(state["num_sets"]) != self.num_sets:
            raise ValueError(f"state was saved for {state['num_sets']} sets, source has {self.num_sets}")
        position, epoch = int(state["position"]), int(state["epoch"])
        if position < 0 or epoch < 0:
            raise ValueError(f"loader state with epoch {epoch}, position {position}: both must be >= 0")
        self._cancel_queue()
        self._epoch, self._position = self._normalize(epoch, position)

    def _cancel_queue(self) -> None:
        for _, jobs in self._queue:
            for job in jobs:
                if isinstance(job, cf.Future):
                    job.cancel()
        self._queue.clear()

    def close(self) -> None:
        """Stop the worker threads (pending prefetch work is cancelled) and close the source's readers."""
        self._cancel_queue()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        close_source = getattr(self.source, "close", None)
        if close_source is not None:
            close_source()

    def __enter__(self) -> "SetLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
