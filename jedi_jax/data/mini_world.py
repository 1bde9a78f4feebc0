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

Everything is deterministic from seeds and vectorised numpy: a 64x64 render takes well under a
millisecond or two, so training can generate sets on the fly (:class:`MiniWorldSource` in
``set_source.py``).

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
import math
import re
from typing import Any, Sequence

import numpy as np

RES = 64

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
# Precomputed pixel grids and smooth-noise upsampling matrices
# ----------------------------------------------------------------------------------------------

_YY, _XX = np.meshgrid(np.arange(RES, dtype=np.float32) + 0.5, np.arange(RES, dtype=np.float32) + 0.5,
                       indexing="ij")
_YN = _YY / RES  # 0 top .. 1 bottom
_XN = _XX / RES


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear upsampling matrix (smooth noise = U @ coarse @ U.T)."""
    pos = (np.arange(n_out) + 0.5) / n_out * n_in - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


_U4 = _interp_matrix(RES, 4)
_U8 = _interp_matrix(RES, 8)
_U16 = _interp_matrix(RES, 16)


def _smooth_noise(rng: np.random.Generator, cells: int, rows: int | None = None) -> np.ndarray:
    """Smooth noise in [0, 1] on the 64x64 grid from a (rows, cells) coarse lattice."""
    u = {4: _U4, 8: _U8, 16: _U16}
    rows = rows or cells
    coarse = rng.random((rows, cells), dtype=np.float32)
    return u[rows] @ coarse @ u[cells].T


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, np.float32).reshape(3, 1, 1)


def _c(*rgb: float) -> np.ndarray:
    """A colour, shaped (3, 1, 1): images are channel-first (3, H, W) inside this module, which
    makes per-pixel colour arithmetic several times faster in numpy than (H, W, 3)."""
    return np.asarray(rgb, np.float32).reshape(3, 1, 1) / 255.0


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours a, b ((3,1,1) or (3,H,W)) with t (H,W) in [0,1]."""
    return a + (b - a) * t[None]


def _step(x: np.ndarray, edge: float | np.ndarray, soft: float = 0.75) -> np.ndarray:
    """Anti-aliased step 0 -> 1 as x crosses edge (soft in pixels/units of x)."""
    return np.clip((x - edge) / soft + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Backgrounds: f(rng) -> (3, 64, 64) float32 in [0, 1]
# ----------------------------------------------------------------------------------------------

def _bg_beach(rng):
    horizon = rng.uniform(14, 26)
    shore = horizon + rng.uniform(8, 16) + 2.0 * np.sin(_XX * rng.uniform(0.08, 0.2) + rng.uniform(0, 6.3))
    sky = _mix(_c(120, 180, 235), _c(200, 230, 250), _YN / max(horizon / RES, 1e-3))
    sea = _mix(_c(20, 90, 170), _c(40, 150, 200), (_YY - horizon) / max(shore.mean() - horizon, 1.0))
    glint = np.sin(_YY * 1.7 + np.sin(_XX * 0.3) + rng.uniform(0, 6.3)) > 0.6
    sea = sea + np.float32(0.08) * glint[None]
    sand_col = _c(225, 200, 150) * rng.uniform(0.92, 1.05)
    sand = sand_col * (0.9 + 0.15 * _smooth_noise(rng, 16))[None]
    img = _mix(sky, sea, _step(_YY, horizon))
    return _mix(img, sand, _step(_YY, shore, 1.2))


def _bg_grass(rng):
    sky_h = rng.uniform(0, 18)
    base = _c(60, 150, 50) * rng.uniform(0.8, 1.15)
    blades = _U16 @ rng.random((16, RES), dtype=np.float32)  # vertical streaks
    grass = base * (0.7 + 0.5 * blades)[None] * (0.85 + 0.25 * _YN)[None]
    sky = _mix(_c(140, 195, 240), _c(210, 235, 250), _YN * 2)
    return _mix(sky, grass, _step(_YY, sky_h + 3 * _smooth_noise(rng, 8), 1.0))


def _bg_snow(rng):
    horizon = rng.uniform(16, 30)
    sky = _mix(_c(170, 180, 195), _c(215, 222, 232), _YN) * rng.uniform(0.9, 1.05)
    ground = _c(240, 245, 252) * (0.88 + 0.12 * _smooth_noise(rng, 8))[None]
    ground = ground * _c(247, 252, 255)
    img = _mix(sky, ground, _step(_YY, horizon + 4 * _smooth_noise(rng, 4), 1.0))
    flakes = rng.random((RES, RES), dtype=np.float32) > 0.965
    return np.where(flakes[None], np.float32(1.0), img)


def _bg_brick(rng):
    bh = rng.uniform(6, 9)
    bw = rng.uniform(12, 19)
    ox, oy = rng.uniform(0, bw), rng.uniform(0, bh)
    yy = _YY + oy
    row = np.floor(yy / bh)
    xx = _XX + ox + (row % 2) * bw * 0.5
    col = np.floor(xx / bw)
    brick_id = (row * 31 + col * 17).astype(np.int64) % 64
    tint = rng.uniform(0.75, 1.15, size=(64,)).astype(np.float32)[brick_id]
    base = _c(165, 70, 50) * rng.uniform(0.8, 1.15)
    img = base * tint[None]
    mortar = ((yy % bh) < 1.2) | ((xx % bw) < 1.2)
    return np.where(mortar[None], _c(200, 195, 185), img)


def _bg_night(rng):
    img = _mix(_c(5, 8, 30), _c(25, 35, 80), _YN) * rng.uniform(0.8, 1.2)
    stars = rng.random((RES, RES), dtype=np.float32)
    img = np.where((stars > 0.975)[None], _c(250, 250, 220) * (0.6 + 0.4 * stars[None]), img)
    mx, my, mr = rng.uniform(6, 58), rng.uniform(5, 20), rng.uniform(3, 6)
    moon = _step(-np.hypot(_XX - mx, _YY - my), -mr)
    img = _mix(img, _c(240, 235, 200), moon)
    hill = 56 + 4 * np.sin(_XX * rng.uniform(0.05, 0.15) + rng.uniform(0, 6.3))
    return _mix(img, _c(5, 5, 12), _step(_YY, hill))


def _bg_desert(rng):
    sky = _mix(_c(235, 200, 140), _c(250, 230, 190), _YN * 2)
    img = sky
    h = rng.uniform(14, 24)
    for k, col in enumerate([_c(220, 160, 90), _c(205, 140, 70), _c(190, 120, 60)]):
        crest = h + 12 * k + 5 * np.sin(_XX * rng.uniform(0.06, 0.14) + rng.uniform(0, 6.3))
        img = _mix(img, col * (0.95 + 0.1 * _smooth_noise(rng, 8))[None], _step(_YY, crest, 1.0))
    sx, sy = rng.uniform(8, 56), rng.uniform(4, h - 4)
    return _mix(img, _c(255, 250, 215), _step(-np.hypot(_XX - sx, _YY - sy), -4.0))


def _bg_forest(rng):
    img = _mix(_c(20, 70, 30), _c(40, 100, 40), _smooth_noise(rng, 8)) * rng.uniform(0.8, 1.15)
    ntrunks = int(rng.integers(3, 7))
    xs = rng.uniform(0, RES, ntrunks).astype(np.float32)
    ws = rng.uniform(2.5, 6, ntrunks).astype(np.float32)
    d = np.min(np.abs(_XX[None] - xs[:, None, None]) - ws[:, None, None] / 2, axis=0)
    img = _mix(img, _c(90, 60, 35) * (0.8 + 0.3 * _smooth_noise(rng, 16, 4))[None], _step(-d, 0.0))
    canopy = 8 + 8 * _smooth_noise(rng, 16, 4)
    img = _mix(img, _c(30, 110, 45), _step(-_YY, -canopy))
    return _mix(img, _c(70, 55, 30), _step(_YY, 58.0))


def _bg_water(rng):
    f1, f2 = rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.3)
    p1, p2 = (float(x) for x in rng.uniform(0, 6.3, 2))
    waves = np.sin(_YY * f1 + 2.5 * np.sin(_XX * f2 + p2) + p1)
    deep = _c(15, 70, 140) * rng.uniform(0.85, 1.15)
    img = _mix(deep, _c(50, 140, 200), 0.5 + 0.3 * waves + 0.3 * _YN)
    return np.where((waves > 0.9)[None], _c(190, 225, 245), img)


def _bg_studio(rng):
    tint = _hsv(rng.random(), rng.uniform(0.0, 0.15), 1.0)
    seam = rng.uniform(38, 50)
    wall = tint * (0.62 + 0.25 * (1 - np.hypot(_XN - 0.5, _YN - 0.3)))[None]
    floor = tint * (0.5 + 0.15 * _YN)[None]
    return _mix(wall, floor, _step(_YY, seam, 3.0))


def _bg_road(rng):
    img = _c(80, 80, 85) * (0.85 + 0.2 * rng.random((RES, RES), dtype=np.float32))[None]
    ly = rng.uniform(44, 56)
    dash, off = rng.uniform(8, 14), rng.uniform(0, 14)
    lane = (np.abs(_YY - ly) < 1.5) & (((_XX + off) % dash) < dash * 0.55)
    img = np.where(lane[None], _c(240, 200, 40), img)
    verge = rng.uniform(4, 10)
    img = _mix(_c(100, 150, 70), img, _step(_YY, verge))
    return np.where((np.abs(_YY - verge - 1.5) < 1.0)[None], _c(225, 225, 225), img)


_BG_FNS = [_bg_beach, _bg_grass, _bg_snow, _bg_brick, _bg_night,
           _bg_desert, _bg_forest, _bg_water, _bg_studio, _bg_road]
assert len(_BG_FNS) == len(BACKGROUNDS) == len(BACKGROUND_PHRASES)


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


def _rot_uv(u, v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return c * u + s * v, -s * u + c * v


def _sd_round_box(u, v, cu, cv, hu, hv, r):
    qu = np.abs(u - cu) - (hu - r)
    qv = np.abs(v - cv) - (hv - r)
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0) - r


def _sd_ellipse(u, v, cu, cv, ru, rv):
    # Cheap approximate SDF (exact for circles), good enough for anti-aliasing.
    k = np.hypot((u - cu) / ru, (v - cv) / rv)
    return (k - 1) * min(ru, rv)


def _sd_segment_side(qu, qv, au, av, bu, bv):
    """Signed distance to the line a->b; positive on its left (outside for the clockwise edges used
    here: the origin side is negative)."""
    eu, ev = bu - au, bv - av
    n = math.hypot(eu, ev)
    return ((qv - av) * eu - (qu - au) * ev) / n


_PROFILE_GRID = np.linspace(-1, 1, 33, dtype=np.float32)


def _vase_profile(parts: Sequence[float], aspect: float) -> np.ndarray:
    base_w, belly_w, belly_y, neck_w, lip_w, _ = parts
    base_w = (0.3 + 0.25 * base_w) * aspect
    belly_w = (0.65 + 0.35 * belly_w) * aspect
    belly_y = -0.55 + 0.6 * belly_y
    neck_w = (0.18 + 0.17 * neck_w) * aspect
    lip_w = (0.28 + 0.22 * lip_w) * aspect
    ys = np.array([-1.0, belly_y, 0.62, 1.0])
    ws = np.array([base_w, belly_w, neck_w, lip_w])
    grid = np.linspace(-1, 1, 33)
    # Cosine interpolation between control points: smooth, no overshoot.
    idx = np.clip(np.searchsorted(ys, grid, side="right") - 1, 0, 2)
    t = (grid - ys[idx]) / (ys[idx + 1] - ys[idx])
    t = (1 - np.cos(np.pi * np.clip(t, 0, 1))) / 2
    return (ws[idx] * (1 - t) + ws[idx + 1] * t).astype(np.float32)


def _shape(cat: int, u, v, aspect: float, parts: Sequence[float]):
    """Object-local SDF (negative inside) and the secondary-part indicator (float in [0,1])."""
    p = parts
    a = aspect
    name = CATEGORIES[cat]
    if name == "ball":
        sd = _sd_ellipse(u, v, 0, 0, a, 1.0)
        band_v, band_w = -0.35 + 0.7 * p[0], 0.08 + 0.14 * p[1]
        part = _step(band_w - np.abs(v - band_v), 0.0, 0.08)
    elif name == "box":
        r = 0.05 + 0.25 * p[0]
        sd = _sd_round_box(u, v, 0, 0, a, 1.0, r)
        lid = 0.15 + 0.25 * p[1]
        part = _step(v, 1 - 2 * lid, 0.08)
    elif name == "vase":
        prof = _vase_profile(p, a)
        w = np.interp(v, _PROFILE_GRID, prof).astype(np.float32)
        sd = np.maximum(np.abs(u) - w, np.abs(v) - 1.0)
        lip_h = 0.1 + 0.2 * p[5]
        part = _step(v, 1 - lip_h, 0.06)
    elif name == "star":
        n = 5 if p[0] < 0.5 else 6
        ri = 0.38 + 0.22 * p[1]
        m = np.pi / n
        r = np.hypot(u / a, v)
        ang = np.arctan2(u / a, v)
        al = np.abs(np.mod(ang + m, 2 * m) - m)
        qu, qv = r * np.cos(al), r * np.sin(al)
        p2u, p2v = ri * math.cos(m), ri * math.sin(m)
        sd = _sd_segment_side(qu, qv, p2u, p2v, 1.0, 0.0) * a
        pc = 0.18 + 0.17 * p[2]
        part = _step(pc - r, 0.0, 0.06)
    elif name == "ring":
        t = 0.2 + 0.22 * p[0]
        rc = 1.0 - t
        r = np.hypot(u / a, v)
        sd = (np.abs(r - rc) - t) * a
        gem = 0.16 + 0.16 * p[1]
        gem_sd = _sd_ellipse(u, v, 0, rc, gem, gem)
        sd = np.minimum(sd, gem_sd)
        part = _step(-gem_sd, 0.0, 0.06)
    elif name == "bottle":
        wb = (0.45 + 0.35 * p[0]) * a
        vs = 0.0 + 0.4 * p[1]
        wn = 0.13 + 0.13 * p[2]
        body = _sd_round_box(u, v, 0, (vs - 1) / 2, wb, (vs + 1) / 2, 0.18)
        neck = _sd_round_box(u, v, 0, (vs + 0.8) / 2, wn, (1 - vs + 0.2) / 2, 0.04)
        k = 0.25  # smooth union at the shoulder
        h = np.clip(0.5 + 0.5 * (neck - body) / k, 0, 1)
        sd = neck * (1 - h) + body * h - k * h * (1 - h)
        ch = 0.12 + 0.15 * p[3]
        part = _step(v, 1 - ch, 0.05)
    elif name == "mushroom":
        hc = 0.5 + 0.35 * p[0]
        wc = (0.8 + 0.2 * p[1]) * a
        ws = (0.18 + 0.2 * p[2]) * a
        vb = 1.0 - hc
        cap = np.maximum(_sd_ellipse(u, v, 0, vb, wc, hc), vb - 0.12 - v)
        stem = _sd_round_box(u, v, 0, (vb - 1) / 2, ws, (vb + 1) / 2 + 0.02, 0.08)
        sd = np.minimum(cap, stem)
        part = _step(-cap, 0.0, 0.06) < 0.5
        part = part.astype(np.float32)
    elif name == "kite":
        w = (0.55 + 0.4 * p[0]) * a
        vc = 0.1 + 0.4 * p[1]
        qu = np.abs(u)
        d_up = _sd_segment_side(qu, v, 0.0, 1.0, w, vc)
        d_lo = _sd_segment_side(qu, v, w, vc, 0.0, -1.0)
        sd = np.maximum(d_up, d_lo)
        panels = (u > 0) ^ (v > vc) if p[2] < 0.5 else (v > vc)
        part = panels.astype(np.float32)
    elif name == "cup":
        top = 0.55 + 0.45 * p[0]
        hs = 0.3 + 0.2 * p[1]  # handle radius
        wb = (0.8 - 0.5 * hs) * a
        cu = -hs * 0.55
        body = _sd_round_box(u, v, cu, (top - 1) / 2, wb, (top + 1) / 2, 0.12)
        hv = -0.1 + 0.3 * p[2]
        th = 0.09 + 0.07 * p[3]
        hcu = cu + wb
        handle = np.maximum(np.abs(np.hypot(u - hcu, v - hv) - hs) - th, hcu - u)
        sd = np.minimum(body, handle)
        part = _step(-handle, 0.0, 0.06) * (u > hcu)
    elif name == "house":
        wb = (0.55 + 0.3 * p[0]) * a
        vw = -0.15 + 0.4 * p[1]
        wr = wb + 0.05 + 0.15 * p[2]
        walls = _sd_round_box(u, v, 0, (vw - 1) / 2, wb, (vw + 1) / 2, 0.02)
        qu = np.abs(u)
        roof = np.maximum(_sd_segment_side(qu, v, 0.0, 1.0, wr, vw), vw - v)
        sd = np.minimum(walls, roof)
        part = _step(-roof, 0.0, 0.05)
        dw, dh = 0.12 + 0.1 * p[3], 0.35 + 0.25 * p[4]
        door_u = (-0.5 + p[5]) * (wb - dw) * 1.6
        door = _sd_round_box(u, v, door_u, -1 + dh / 2, dw, dh / 2, 0.02)
        part = np.maximum(part, 2.0 * _step(-door, 0.0, 0.05))  # 2 = door (dark)
    else:  # pragma: no cover
        raise ValueError(name)
    return sd, part


def _mark_sd(shape: int, u, v, mu, mv, r):
    du, dv = u - mu, v - mv
    if MARK_SHAPES[shape] == "dot":
        return np.hypot(du, dv) - r
    if MARK_SHAPES[shape] == "square":
        return np.maximum(np.abs(du), np.abs(dv)) - 0.85 * r
    return (np.abs(du) + np.abs(dv)) * (1 / math.sqrt(2)) - 0.8 * r  # diamond


def _texture(subject: Subject, u, v, px: float) -> np.ndarray:
    """Pattern value in [0,1] (0 = colour A, 1 = colour B) in object-local coords."""
    f, ang, ph, ex = subject.tex_freq, subject.tex_angle, subject.tex_phase, subject.tex_extra
    ru, rv = _rot_uv(u, v, ang)
    kind = TEXTURES[subject.texture]
    soft = 1.6 * px * f  # transition width in pattern units, ~1.6 px
    if kind == "stripes":
        s = np.sin(2 * np.pi * f * ru + ph)
        return np.clip(0.5 + s / (2 * np.pi * soft + 1e-6), 0, 1)
    if kind == "waves":
        amp = 0.1 + 0.25 * ex
        s = np.sin(2 * np.pi * f * (ru + amp * np.sin(2 * np.pi * 0.8 * rv + ph)) + ph)
        return np.clip(0.5 + s / (2 * np.pi * soft + 1e-6), 0, 1)
    if kind == "checks":
        s = np.sin(2 * np.pi * f * ru + ph) * np.sin(2 * np.pi * f * rv + ph)
        return np.clip(0.5 + s / (2 * np.pi * soft + 1e-6), 0, 1)
    if kind == "dots":
        gu = ru * f + ph / (2 * np.pi)
        gv = rv * f
        du = gu - np.round(gu)
        dv = gv - np.round(gv)
        rad = 0.2 + 0.15 * ex
        return np.clip(0.5 + (rad - np.hypot(du, dv)) / soft, 0, 1)
    # rings: concentric around an off-centre point
    cu, cv = 0.6 * (ex - 0.5), 0.6 * math.sin(ph)
    s = np.sin(2 * np.pi * f * np.hypot(u - cu, v - cv) + ph)
    return np.clip(0.5 + s / (2 * np.pi * soft + 1e-6), 0, 1)


def _distinct_palette(rng: np.random.Generator):
    h1 = rng.random()
    a = _hsv(h1, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    h2 = h1 + rng.uniform(0.2, 0.8)
    b = _hsv(h2, rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0))
    if np.abs(a - b).sum() < 0.6:  # make sure the two body colours are far apart in value
        b = _hsv(h2, rng.uniform(0.4, 1.0), 1.2 - float(a.max()))
    c = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
    lum = float(a.mean() + b.mean()) / 2
    mark_v = rng.uniform(0.05, 0.3) if lum > 0.5 else rng.uniform(0.85, 1.0)
    m = _hsv(rng.random(), rng.uniform(0.0, 1.0), mark_v)
    return a, b, c, m


def _subject_seed(split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([_SUBJECT_TAG, _SPLIT_TAG[split], int(index)])


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
    sd, part = _shape(int(cat), gu, gv, aspect, parts)
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
    """The ``index``-th subject of a split (train/test seed spaces are disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ss = _subject_seed(split, index)
    seed = int(ss.generate_state(1, np.uint32)[0] & 0x7FFFFFFF)
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
    return np.clip(_BG_FNS[context.background](rng), 0, 1).astype(np.float32, copy=False)


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
    u, v = _rot_uv((_XX - cx) / s, (cy - _YY) / s, context.tilt)
    sd, part = _shape(subject.category, u, v, subject.aspect, subject.parts)
    alpha = np.clip(0.5 - sd / px, 0, 1)
    a, b, c = (np.asarray(col, np.float32).reshape(3, 1, 1) for col in subject.colors)
    t = _texture(subject, u, v, px)
    body = _mix(a, b, t)
    if CATEGORIES[subject.category] == "house":
        door = np.clip(part - 1.0, 0, 1)
        body = _mix(body, c, np.clip(part, 0, 1))
        body = _mix(body, c * 0.3, door)
    else:
        body = _mix(body, c, part)
    # the distinctive mark
    msd = _mark_sd(subject.mark_shape, u, v, subject.mark_pos[0], subject.mark_pos[1],
                   subject.mark_radius)
    body = _mix(body, np.asarray(subject.mark_color, np.float32).reshape(3, 1, 1), np.clip(0.5 - msd / px, 0, 1))
    # simple shading (lit from the top-left, in image space) and a dark outline
    shade = 1.08 - 0.1 * (_YY - cy) / s - 0.04 * (_XX - cx) / s
    outline = np.clip((sd / px + 1.6), 0, 1)  # 1 within ~1.6px of the edge
    body = body * (shade * (1 - 0.45 * outline))[None]
    img = _mix(img, body, alpha)
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
    import sys
    args = sys.argv[1:]
    out = save_grid(args[0] if args else "/tmp/mini_world_grid.png",
                    args[1] if len(args) > 1 else "train", int(args[2]) if len(args) > 2 else 8)
    print("wrote", out)
