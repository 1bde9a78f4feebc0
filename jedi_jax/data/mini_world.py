"""The mini world: a procedural same-subject image world for proving that a tiny JeDi learns.

No real Stable Diffusion weights or photo data sets reach our machines, so JeDi's ability is shown on
a world where it can be measured exactly:

* A **subject** is a toy object of one of ``CATEGORIES`` (a shape word the captions use), but its
  *identity* is what the words cannot say: a continuous palette (3 colours), a texture (stripes,
  dots, checks, waves or rings with their own frequency, angle and phase), proportions (aspect and
  part ratios) and a small mark (a dot/square/diamond of its own colour at its own position).
* A **context** is what the captions say: one of ``BACKGROUNDS`` (each drawn with its own random
  variation), a placement (``PLACEMENTS``), a size (``SIZES``) and an orientation
  (``ORIENTATIONS``), plus nuisance (position jitter, tilt angle, background seed) that captions
  don't mention.
* A **set** is ``n`` renders of one subject in different contexts, each with a caption that always
  names the category and the background.

Everything is deterministic from seeds and vectorised numpy (the pixel painters are in
``mini_paint.py``; this file is the world's vocabulary, subjects, contexts, captions and sets): a
64x64 render takes well under a millisecond or two, so training can generate sets on the fly
(:class:`MiniWorldSource` in ``set_source.py``).

Splits: train and test subjects come from disjoint seed spaces (and names), and the context pairs
(background, placement) in ``HELDOUT_COMBOS`` are never rendered for ``split="train"``; the
``"test"`` split draws half of its contexts from them (``"heldout"`` draws only from them).

Per-render ground truth (category, background, placement, size, orientation, subject id) and the
foreground mask come with every set, for evaluation (context classifiers, identity metrics on the
subject's pixels).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any, Sequence

import numpy as np

from jedi_jax.data import mini_paint as paint
from jedi_jax.data.mini_paint import RES

CATEGORIES: list[str] = [
    "ball", "box", "vase", "star", "ring", "bottle", "mushroom", "kite", "cup", "house",
]
BACKGROUNDS: list[str] = [
    "beach", "grass", "snow", "brick wall", "night sky",
    "desert", "forest", "water", "studio", "road",
]
# How each background reads after the object ("a ball on the beach").
BACKGROUND_PHRASES: list[str] = [
    "on the beach", "on the grass", "in the snow", "in front of a brick wall", "under the night sky",
    "in the desert", "in the forest", "on the water", "in a studio", "on the road",
]
PLACEMENTS: list[str] = ["left", "center", "right"]
SIZES: list[str] = ["small", "large"]
ORIENTATIONS: list[str] = ["upright", "tilted"]
TEXTURES: list[str] = ["stripes", "dots", "checks", "waves", "rings"]
MARK_SHAPES: list[str] = ["dot", "square", "diamond"]
SPLITS: tuple[str, ...] = ("train", "test", "heldout")

# (background, placement) pairs that split="train" never renders.
HELDOUT_COMBOS: list[tuple[str, str]] = [
    ("beach", "right"), ("grass", "left"), ("snow", "center"), ("brick wall", "right"),
    ("night sky", "left"), ("desert", "center"), ("forest", "right"), ("water", "left"),
    ("studio", "center"), ("road", "left"),
]
_HELDOUT_IDS = [(BACKGROUNDS.index(b), PLACEMENTS.index(p)) for b, p in HELDOUT_COMBOS]
_ALL_COMBOS = [(b, p) for b in range(len(BACKGROUNDS)) for p in range(len(PLACEMENTS))]
TRAIN_COMBOS: list[tuple[int, int]] = [c for c in _ALL_COMBOS if c not in _HELDOUT_IDS]
HELDOUT_COMBO_IDS: list[tuple[int, int]] = list(_HELDOUT_IDS)
assert sorted(paint.BACKGROUND_PAINTERS) == sorted(BACKGROUNDS) and len(BACKGROUND_PHRASES) == len(BACKGROUNDS)

# Caption templates. {cat} category, {bg} background name, {bgp} background phrase,
# {place} placement, {size} size, {orient} orientation. Every template names {cat} and {bg}/{bgp}.
TEMPLATES: list[str] = [
    "a photo of a {cat} {bgp}",
    "a {cat} {bgp}",
    "a {size} {cat} {bgp}",
    "a {orient} {cat} {bgp}",
    "a photo of a {size} {cat} at the {place} of a {bg} scene",
    "a {cat} at the {place} of a {bg} scene",
    "a {bg} scene with a {size} {orient} {cat} at the {place}",
    "a photo of a {size} {orient} {cat} {bgp} at the {place}",
]
# The template used for "prompted contexts" (ground truth of a prompt says every label).
FULL_TEMPLATE = "a photo of a {size} {orient} {cat} at the {place} of a {bg} scene"

# Seed-space tags: subjects of different splits never share a seed (nor a name).
_SPLIT_TAG = {"train": 1, "test": 2, "heldout": 2}
_SUBJECT_TAG = 11
_SET_TAG = 13

# ----------------------------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subject:
    """All identity parameters of one subject (deterministic from its seed).

    Geometry lives in object-local units: the object spans v in [-1, 1] (y up), u in about [-1, 1].
    """
    name: str
    category: int
    colors: tuple[tuple[float, float, float], ...]  # (body A, body B, part C) RGB in [0,1]
    texture: int  # index into TEXTURES
    tex_freq: float  # cycles per object unit
    tex_angle: float  # radians
    tex_phase: float  # radians
    tex_extra: float  # dot radius / wave amplitude / ring centre offset, in [0, 1]
    aspect: float  # width scale
    parts: tuple[float, ...]  # category-specific proportions in [0, 1]
    mark_shape: int  # index into MARK_SHAPES
    mark_pos: tuple[float, float]  # (u, v) object-local
    mark_radius: float
    mark_color: tuple[float, float, float]
    seed: int = 0

    @property
    def category_name(self) -> str:
        return CATEGORIES[self.category]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Subject":
        d = dict(d)
        d["colors"] = tuple(tuple(float(x) for x in c) for c in d["colors"])
        d["parts"] = tuple(float(x) for x in d["parts"])
        d["mark_pos"] = tuple(float(x) for x in d["mark_pos"])
        d["mark_color"] = tuple(float(x) for x in d["mark_color"])
        return cls(**d)


def _distinct_palette(rng: np.random.Generator):
    h1 = rng.random()
    a = paint.hsv(h1, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    h2 = h1 + rng.uniform(0.2, 0.8)
    b = paint.hsv(h2, rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0))
    if np.abs(a - b).sum() < 0.6:  # make sure the two body colours are far apart in value
        b = paint.hsv(h2, rng.uniform(0.4, 1.0), 1.2 - float(a.max()))
    c = paint.hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
    lum = float(a.mean() + b.mean()) / 2
    mark_v = rng.uniform(0.05, 0.3) if lum > 0.5 else rng.uniform(0.85, 1.0)
    m = paint.hsv(rng.random(), rng.uniform(0.0, 1.0), mark_v)
    return a, b, c, m


def subject_seed(split: str, index: int) -> int:
    """The seed `sample_subject` draws the ``index``-th subject of ``split`` from: 31 bits of the
    split's own SeedSequence stream (a plain int, so a Subject records it)."""
    ss = np.random.SeedSequence([_SUBJECT_TAG, _SPLIT_TAG[split], int(index)])
    return int(ss.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def sample_subject(rng: np.random.Generator | int, category: int | str | None = None,
                   name: str | None = None) -> Subject:
    """Samples all identity parameters of a subject (palette, texture, proportions, mark)."""
    if not isinstance(rng, np.random.Generator):
        seed = int(rng)
        rng = np.random.default_rng(seed)
    else:
        seed = int(rng.integers(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
    cat = rng.integers(len(CATEGORIES))
    if category is not None:
        cat = CATEGORIES.index(category) if isinstance(category, str) else int(category)
    a, b, c, m = _distinct_palette(rng)
    texture = int(rng.integers(len(TEXTURES)))
    tex_freq = float(rng.uniform(1.0, 2.6)) if TEXTURES[texture] != "dots" else float(rng.uniform(1.4, 2.6))
    parts = tuple(float(x) for x in rng.random(6))
    aspect_lo = {"ball": 0.85, "ring": 0.85, "star": 0.9, "kite": 0.8}.get(CATEGORIES[cat], 0.6)
    aspect = float(rng.uniform(aspect_lo, 1.0))
    # Mark: a point well inside the textured body (not on the secondary part).
    mark_radius = float(rng.uniform(0.13, 0.2))
    g = np.linspace(-1, 1, 41, dtype=np.float32)
    gv, gu = np.meshgrid(g, g, indexing="ij")
    sd, part = paint.shape_sdf(CATEGORIES[int(cat)], gu, gv, aspect, parts)
    ok = (sd < -mark_radius - 0.08) & (part < 0.5)
    if not ok.any():
        ok = sd < -0.02
    cand = np.argwhere(ok)
    j = cand[rng.integers(len(cand))]
    mark_pos = (float(gu[j[0], j[1]]), float(gv[j[0], j[1]]))
    subj = Subject(
        name=name or f"subject_{seed:010d}",
        category=int(cat),
        colors=tuple(tuple(float(x) for x in col.ravel()) for col in (a, b, c)),
        texture=texture,
        tex_freq=tex_freq,
        tex_angle=float(rng.uniform(0, np.pi)),
        tex_phase=float(rng.uniform(0, 2 * np.pi)),
        tex_extra=float(rng.random()),
        aspect=aspect,
        parts=parts,
        mark_shape=int(rng.integers(len(MARK_SHAPES))),
        mark_pos=mark_pos,
        mark_radius=mark_radius,
        mark_color=tuple(float(x) for x in m.ravel()),
        seed=seed,
    )
    return subj


@functools.lru_cache(maxsize=4096)
def subject_for(split: str, index: int) -> Subject:
    """The ``index``-th subject of a split. Train and test draw from different seed streams, but the
    subject seed keeps 31 bits, so two streams can meet by chance (about 1 in 2**31 per pair; test
    4,961 equals a train subject below 10**6): tests/test_data_world.py checks the ranges in use."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    seed = subject_seed(split, index)
    tag = "train" if split == "train" else "test"
    subj = sample_subject(seed)
    return dataclasses.replace(subj, name=f"{tag}_{CATEGORIES[subj.category]}_{index:06d}")


# ----------------------------------------------------------------------------------------------
# Contexts
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Context:
    """What the caption says (background, placement, size, orientation) plus unsaid nuisance."""
    background: int
    placement: int
    size: int  # 0 small, 1 large
    orientation: int  # 0 upright, 1 tilted
    tilt: float = 0.0  # radians, 0 when upright
    dx: float = 0.0  # position jitter, pixels
    dy: float = 0.0
    scale_jitter: float = 1.0
    bg_seed: int = 0

    @property
    def labels(self) -> dict[str, int]:
        return dict(background=self.background, placement=self.placement, size=self.size,
                    orientation=self.orientation)

    def words(self) -> dict[str, str]:
        return dict(bg=BACKGROUNDS[self.background], bgp=BACKGROUND_PHRASES[self.background],
                    place=PLACEMENTS[self.placement], size=SIZES[self.size],
                    orient=ORIENTATIONS[self.orientation])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_context(background: int | str, placement: int | str, size: int | str = 0,
                 orientation: int | str = 0, seed: int = 0, jitter: bool = True) -> Context:
    """A context from its labels (names or ids); nuisance drawn from ``seed`` (none if not jitter)."""
    def idx(x, names):
        return names.index(x) if isinstance(x, str) else int(x)
    b, p, s, o = idx(background, BACKGROUNDS), idx(placement, PLACEMENTS), idx(size, SIZES), \
        idx(orientation, ORIENTATIONS)
    rng = np.random.default_rng(np.random.SeedSequence([17, int(seed), b, p, s, o]))
    tilt = float(rng.uniform(0.3, 0.55) * rng.choice([-1, 1])) if o == 1 else 0.0
    if not jitter:
        return Context(b, p, s, o, tilt=0.42 * (1 if o else 0), bg_seed=int(seed))
    return Context(b, p, s, o, tilt=tilt, dx=float(rng.uniform(-2.5, 2.5)), dy=float(rng.uniform(-2.5, 2.5)),
                   scale_jitter=float(rng.uniform(0.93, 1.07)), bg_seed=int(rng.integers(0, 2**31 - 1)))


def _combos_for(split: str) -> list[tuple[int, int]]:
    if split == "train":
        return TRAIN_COMBOS
    if split == "heldout":
        return HELDOUT_COMBO_IDS
    if split == "test":
        return _ALL_COMBOS
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_context(rng: np.random.Generator, split: str = "train",
                   exclude_backgrounds: Sequence[int] = ()) -> Context:
    """A random context allowed in ``split``.

    train: never a (background, placement) pair of HELDOUT_COMBOS. test: a held-out pair with
    probability 1/2, else a training pair. heldout: only held-out pairs.
    """
    if split == "test":
        combos = HELDOUT_COMBO_IDS if rng.random() < 0.5 else TRAIN_COMBOS
    else:
        combos = _combos_for(split)
    allowed = [c for c in combos if c[0] not in exclude_backgrounds] or list(combos)
    b, p = allowed[int(rng.integers(len(allowed)))]
    return make_context(b, p, int(rng.integers(2)), int(rng.integers(2)),
                        seed=int(rng.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_PLACE_X = {0: (17.0, 22.0), 1: (32.0, 32.0), 2: (47.0, 42.0)}  # (small, large) centre x
_SCALE = (11.5, 17.5)  # half-height in pixels (small, large): ~36% / ~55% of the image
_CENTER_Y = 34.0


def _background_chw(context: Context) -> np.ndarray:
    rng = np.random.default_rng(context.bg_seed)
    img = paint.BACKGROUND_PAINTERS[BACKGROUNDS[context.background]](rng)  # (3, 64, 64)
    return np.clip(img, 0, 1).astype(np.float32, copy=False)


def render_background(context: Context) -> np.ndarray:
    """The context's background alone, uint8 (64, 64, 3) (what ``render`` draws the object on)."""
    return _to_uint8(_background_chw(context))


def _to_uint8(img_chw: np.ndarray) -> np.ndarray:
    return np.clip(img_chw * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def render(subject: Subject, context: Context) -> tuple[np.ndarray, np.ndarray]:
    """Renders ``subject`` in ``context``: (image uint8 (64,64,3), foreground mask bool (64,64))."""
    img = _background_chw(context)
    s = _SCALE[context.size] * context.scale_jitter
    cx = _PLACE_X[context.placement][context.size] + context.dx
    cy = _CENTER_Y + context.dy
    px = 1.0 / s  # one pixel in object units
    # object-local coordinates: u right, v up, rotated with the tilt
    u, v = paint.rot_uv((paint.XX - cx) / s, (cy - paint.YY) / s, context.tilt)
    sd, part = paint.shape_sdf(subject.category_name, u, v, subject.aspect, subject.parts)
    alpha = np.clip(0.5 - sd / px, 0, 1)
    a, b, c = (np.asarray(col, np.float32).reshape(3, 1, 1) for col in subject.colors)
    t = paint.texture(TEXTURES[subject.texture], subject.tex_freq, subject.tex_angle, subject.tex_phase,
                      subject.tex_extra, u, v, px)
    body = paint.mix(a, b, t)
    if CATEGORIES[subject.category] == "house":
        door = np.clip(part - 1.0, 0, 1)
        body = paint.mix(body, c, np.clip(part, 0, 1))
        body = paint.mix(body, c * 0.3, door)
    else:
        body = paint.mix(body, c, part)
    # the distinctive mark
    msd = paint.mark_sdf(MARK_SHAPES[subject.mark_shape], u, v, subject.mark_pos[0], subject.mark_pos[1],
                         subject.mark_radius)
    body = paint.mix(body, np.asarray(subject.mark_color, np.float32).reshape(3, 1, 1), np.clip(0.5 - msd / px, 0, 1))
    # simple shading (lit from the top-left, in image space) and a dark outline
    shade = 1.08 - 0.1 * (paint.YY - cy) / s - 0.04 * (paint.XX - cx) / s
    outline = np.clip((sd / px + 1.6), 0, 1)  # 1 within ~1.6px of the edge
    body = body * (shade * (1 - 0.45 * outline))[None]
    img = paint.mix(img, body, alpha)
    return _to_uint8(img), alpha > 0.5


def render_in_context(subject: Subject, context: Context | None = None, *, background=None,
                      placement=None, size=None, orientation=None, seed: int = 0,
                      jitter: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth for a prompted context: renders ``subject`` in ``context`` or in the context
    built from the given labels (names or ids; see :func:`parse_caption`), centred (no jitter)
    unless ``jitter``."""
    if context is None:
        context = make_context(background if background is not None else "studio",
                               placement if placement is not None else "center",
                               size if size is not None else "large",
                               orientation if orientation is not None else "upright",
                               seed=seed, jitter=jitter)
    return render(subject, context)


# ----------------------------------------------------------------------------------------------
# Captions and vocabulary
# ----------------------------------------------------------------------------------------------

def caption(subject: Subject, context: Context, rng: np.random.Generator | int | None = None,
            template: int | str | None = None) -> str:
    """A caption of ``subject`` in ``context``: always names the category and the background."""
    if template is None:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    elif isinstance(template, int):
        template = TEMPLATES[template]
    return _articles(template.format(cat=CATEGORIES[subject.category], **context.words()))


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def prompt_for(category: int | str, context: Context, template: str = FULL_TEMPLATE) -> str:
    """The prompt that asks for ``category`` in ``context`` (names every label by default)."""
    cat = category if isinstance(category, str) else CATEGORIES[category]
    return _articles(template.format(cat=cat, **context.words()))


def vocabulary() -> list[str]:
    """Every word any caption can contain (sorted)."""
    words: set[str] = set()
    for t in TEMPLATES + [FULL_TEMPLATE]:
        words.update(w for w in re.sub(r"\{[a-z]+\}", " ", t).split())
    for group in (CATEGORIES, BACKGROUNDS, BACKGROUND_PHRASES, PLACEMENTS, SIZES, ORIENTATIONS):
        for phrase in group:
            words.update(phrase.split())
    words.add("an")  # "a" before a vowel (an upright ...)
    return sorted(words)


def max_caption_words() -> int:
    """Longest caption/prompt in words (+2 for BOS/EOS = the text length a model needs)."""
    longest = {k: max(len(x.split()) for x in v) for k, v in dict(
        cat=CATEGORIES, bg=BACKGROUNDS, bgp=BACKGROUND_PHRASES, place=PLACEMENTS, size=SIZES,
        orient=ORIENTATIONS).items()}
    return max(len(t.split()) + sum(longest[f] - 1 for f in re.findall(r"\{([a-z]+)\}", t))
               for t in TEMPLATES + [FULL_TEMPLATE])


def parse_caption(text: str) -> dict[str, int | None]:
    """Labels a caption/prompt names: category, background, placement, size, orientation
    (None where it names none). Inverse of the templates, for evaluation of prompted contexts."""
    t = " " + " ".join(text.lower().split()) + " "
    out: dict[str, int | None] = {}
    for key, names in (("category", CATEGORIES), ("placement", PLACEMENTS), ("size", SIZES),
                       ("orientation", ORIENTATIONS)):
        hits = [i for i, n in enumerate(names) if f" {n} " in t]
        out[key] = hits[0] if hits else None
    bg = [i for i, n in enumerate(BACKGROUNDS) if f" {n} " in t]
    out["background"] = bg[0] if bg else None
    return out


# ----------------------------------------------------------------------------------------------
# Sets
# ----------------------------------------------------------------------------------------------

def _set_rng(split: str, set_index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SET_TAG, SPLITS.index(split), int(set_index)]))


def make_set(split: str, set_index: int, n: int = 4, num_subjects: int | None = None,
             subject: Subject | None = None) -> dict[str, Any]:
    """The ``set_index``-th set of ``split``: n renders of one subject in different contexts.

    Deterministic from (split, set_index, n, num_subjects). The subject is
    ``subject_for(split, set_index % num_subjects)`` (a fresh subject per set when num_subjects is
    None); backgrounds differ within a set while n <= len(BACKGROUNDS).

    Returns dict(images uint8 (n,64,64,3), masks bool (n,64,64), captions list[str],
    subject str, subject_index int, category int, labels dict of int32 (n,) arrays
    {category, background, placement, size, orientation, subject_id}, contexts list[Context]).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    subj_index = set_index if num_subjects is None else set_index % num_subjects
    if subject is None:
        subject = subject_for(split, subj_index)
    rng = _set_rng(split, set_index)
    images = np.empty((n, RES, RES, 3), np.uint8)
    masks = np.empty((n, RES, RES), bool)
    captions, contexts = [], []
    used: list[int] = []
    for i in range(n):
        ctx = sample_context(rng, split, exclude_backgrounds=used)
        used.append(ctx.background)
        if len(used) >= len(BACKGROUNDS):
            used = []
        images[i], masks[i] = render(subject, ctx)
        captions.append(caption(subject, ctx, rng))
        contexts.append(ctx)
    labels = {k: np.array([c.labels[k] for c in contexts], np.int32)
              for k in ("background", "placement", "size", "orientation")}
    labels["category"] = np.full((n,), subject.category, np.int32)
    labels["subject_id"] = np.full((n,), subj_index, np.int32)
    return dict(images=images, masks=masks, captions=captions, subject=subject.name,
                subject_index=subj_index, category=subject.category, labels=labels,
                contexts=contexts)


def subject_from_name(name: str) -> Subject:
    """Inverse of the names ``subject_for`` gives: "train_ball_000012" -> that subject."""
    m = re.fullmatch(r"(train|test)_([a-z]+)_(\d+)", name)
    if not m:
        raise ValueError(f"not a mini-world subject name: {name!r}")
    subj = subject_for(m.group(1), int(m.group(3)))
    assert subj.name == name, (subj.name, name)
    return subj


def image_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def grid_image(sets: Sequence[dict[str, Any]], pad: int = 2) -> np.ndarray:
    """One row per set (uint8), for a quick look."""
    n = max(len(s["images"]) for s in sets)
    h = RES + pad
    out = np.full((len(sets) * h + pad, n * h + pad, 3), 255, np.uint8)
    for r, s in enumerate(sets):
        for c, im in enumerate(s["images"]):
            out[pad + r * h: pad + r * h + RES, pad + c * h: pad + c * h + RES] = im
    return out


def dumps_subject(subject: Subject) -> str:
    return json.dumps(subject.to_dict())


def save_grid(path: str, split: str = "train", num_sets: int = 8, n: int = 6, start: int = 0,
              zoom: int = 2) -> str:
    """Writes a PNG grid (one row per set) of ``num_sets`` sets of ``split``; returns path."""
    from PIL import Image
    g = grid_image([make_set(split, start + i, n=n) for i in range(num_sets)])
    Image.fromarray(g).resize((g.shape[1] * zoom, g.shape[0] * zoom), Image.NEAREST).save(path)
    return path


if __name__ == "__main__":  # python -m jedi_jax.data.mini_world OUT.png [split] [num_sets]
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m jedi_jax.data.mini_world",
                                      description="Write a PNG grid of mini-world sets (one row per set).")
    _parser.add_argument("out", nargs="?", default="/tmp/mini_world_grid.png",
                         help="output image (default: /tmp/mini_world_grid.png)")
    _parser.add_argument("split", nargs="?", default="train", choices=SPLITS, help="default: train")
    _parser.add_argument("num_sets", nargs="?", default=8, type=int, help="rows (default: 8)")
    _args = _parser.parse_args()
    print("wrote", save_grid(_args.out, _args.split, _args.num_sets))
