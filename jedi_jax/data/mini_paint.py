"""Pixel painters of the mini world (``mini_world.py``): backgrounds, object shapes, textures, marks.

Everything here draws on the fixed 64x64 grid, channel-first ``(3, 64, 64)`` float32 in [0, 1]
(per-pixel colour arithmetic is several times faster in numpy than ``(64, 64, 3)``), from plain
parameters: the world's vocabulary, subjects, contexts and captions live in ``mini_world``, which
composes these painters into renders. Split out so that each file is one idea; the shipped example
renders (``jedi_jax/assets/examples``) pin the pixels (``tests/test_data_world.py``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RES = 64

# ----------------------------------------------------------------------------------------------
# Precomputed pixel grids and smooth-noise upsampling matrices
# ----------------------------------------------------------------------------------------------

YY, XX = np.meshgrid(np.arange(RES, dtype=np.float32) + 0.5, np.arange(RES, dtype=np.float32) + 0.5,
                       indexing="ij")
YN = YY / RES  # 0 top .. 1 bottom
XN = XX / RES


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


def hsv(h: float, s: float, v: float) -> np.ndarray:
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


def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
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
    shore = horizon + rng.uniform(8, 16) + 2.0 * np.sin(XX * rng.uniform(0.08, 0.2) + rng.uniform(0, 6.3))
    sky = mix(_c(120, 180, 235), _c(200, 230, 250), YN / max(horizon / RES, 1e-3))
    sea = mix(_c(20, 90, 170), _c(40, 150, 200), (YY - horizon) / max(shore.mean() - horizon, 1.0))
    glint = np.sin(YY * 1.7 + np.sin(XX * 0.3) + rng.uniform(0, 6.3)) > 0.6
    sea = sea + np.float32(0.08) * glint[None]
    sand_col = _c(225, 200, 150) * rng.uniform(0.92, 1.05)
    sand = sand_col * (0.9 + 0.15 * _smooth_noise(rng, 16))[None]
    img = mix(sky, sea, _step(YY, horizon))
    return mix(img, sand, _step(YY, shore, 1.2))


def _bg_grass(rng):
    sky_h = rng.uniform(0, 18)
    base = _c(60, 150, 50) * rng.uniform(0.8, 1.15)
    blades = _U16 @ rng.random((16, RES), dtype=np.float32)  # vertical streaks
    grass = base * (0.7 + 0.5 * blades)[None] * (0.85 + 0.25 * YN)[None]
    sky = mix(_c(140, 195, 240), _c(210, 235, 250), YN * 2)
    return mix(sky, grass, _step(YY, sky_h + 3 * _smooth_noise(rng, 8), 1.0))


def _bg_snow(rng):
    horizon = rng.uniform(16, 30)
    sky = mix(_c(170, 180, 195), _c(215, 222, 232), YN) * rng.uniform(0.9, 1.05)
    ground = _c(240, 245, 252) * (0.88 + 0.12 * _smooth_noise(rng, 8))[None]
    ground = ground * _c(247, 252, 255)
    img = mix(sky, ground, _step(YY, horizon + 4 * _smooth_noise(rng, 4), 1.0))
    flakes = rng.random((RES, RES), dtype=np.float32) > 0.965
    return np.where(flakes[None], np.float32(1.0), img)


def _bg_brick(rng):
    bh = rng.uniform(6, 9)
    bw = rng.uniform(12, 19)
    ox, oy = rng.uniform(0, bw), rng.uniform(0, bh)
    yy = YY + oy
    row = np.floor(yy / bh)
    xx = XX + ox + (row % 2) * bw * 0.5
    col = np.floor(xx / bw)
    brick_id = (row * 31 + col * 17).astype(np.int64) % 64
    tint = rng.uniform(0.75, 1.15, size=(64,)).astype(np.float32)[brick_id]
    base = _c(165, 70, 50) * rng.uniform(0.8, 1.15)
    img = base * tint[None]
    mortar = ((yy % bh) < 1.2) | ((xx % bw) < 1.2)
    return np.where(mortar[None], _c(200, 195, 185), img)


def _bg_night(rng):
    img = mix(_c(5, 8, 30), _c(25, 35, 80), YN) * rng.uniform(0.8, 1.2)
    stars = rng.random((RES, RES), dtype=np.float32)
    img = np.where((stars > 0.975)[None], _c(250, 250, 220) * (0.6 + 0.4 * stars[None]), img)
    mx, my, mr = rng.uniform(6, 58), rng.uniform(5, 20), rng.uniform(3, 6)
    moon = _step(-np.hypot(XX - mx, YY - my), -mr)
    img = mix(img, _c(240, 235, 200), moon)
    hill = 56 + 4 * np.sin(XX * rng.uniform(0.05, 0.15) + rng.uniform(0, 6.3))
    return mix(img, _c(5, 5, 12), _step(YY, hill))


def _bg_desert(rng):
    sky = mix(_c(235, 200, 140), _c(250, 230, 190), YN * 2)
    img = sky
    h = rng.uniform(14, 24)
    for k, col in enumerate([_c(220, 160, 90), _c(205, 140, 70), _c(190, 120, 60)]):
        crest = h + 12 * k + 5 * np.sin(XX * rng.uniform(0.06, 0.14) + rng.uniform(0, 6.3))
        img = mix(img, col * (0.95 + 0.1 * _smooth_noise(rng, 8))[None], _step(YY, crest, 1.0))
    sx, sy = rng.uniform(8, 56), rng.uniform(4, h - 4)
    return mix(img, _c(255, 250, 215), _step(-np.hypot(XX - sx, YY - sy), -4.0))


def _bg_forest(rng):
    img = mix(_c(20, 70, 30), _c(40, 100, 40), _smooth_noise(rng, 8)) * rng.uniform(0.8, 1.15)
    ntrunks = int(rng.integers(3, 7))
    xs = rng.uniform(0, RES, ntrunks).astype(np.float32)
    ws = rng.uniform(2.5, 6, ntrunks).astype(np.float32)
    d = np.min(np.abs(XX[None] - xs[:, None, None]) - ws[:, None, None] / 2, axis=0)
    img = mix(img, _c(90, 60, 35) * (0.8 + 0.3 * _smooth_noise(rng, 16, 4))[None], _step(-d, 0.0))
    canopy = 8 + 8 * _smooth_noise(rng, 16, 4)
    img = mix(img, _c(30, 110, 45), _step(-YY, -canopy))
    return mix(img, _c(70, 55, 30), _step(YY, 58.0))


def _bg_water(rng):
    f1, f2 = rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.3)
    p1, p2 = (float(x) for x in rng.uniform(0, 6.3, 2))
    waves = np.sin(YY * f1 + 2.5 * np.sin(XX * f2 + p2) + p1)
    deep = _c(15, 70, 140) * rng.uniform(0.85, 1.15)
    img = mix(deep, _c(50, 140, 200), 0.5 + 0.3 * waves + 0.3 * YN)
    return np.where((waves > 0.9)[None], _c(190, 225, 245), img)


def _bg_studio(rng):
    tint = hsv(rng.random(), rng.uniform(0.0, 0.15), 1.0)
    seam = rng.uniform(38, 50)
    wall = tint * (0.62 + 0.25 * (1 - np.hypot(XN - 0.5, YN - 0.3)))[None]
    floor = tint * (0.5 + 0.15 * YN)[None]
    return mix(wall, floor, _step(YY, seam, 3.0))


def _bg_road(rng):
    img = _c(80, 80, 85) * (0.85 + 0.2 * rng.random((RES, RES), dtype=np.float32))[None]
    ly = rng.uniform(44, 56)
    dash, off = rng.uniform(8, 14), rng.uniform(0, 14)
    lane = (np.abs(YY - ly) < 1.5) & (((XX + off) % dash) < dash * 0.55)
    img = np.where(lane[None], _c(240, 200, 40), img)
    verge = rng.uniform(4, 10)
    img = mix(_c(100, 150, 70), img, _step(YY, verge))
    return np.where((np.abs(YY - verge - 1.5) < 1.0)[None], _c(225, 225, 225), img)



BACKGROUND_PAINTERS = {
    "beach": _bg_beach, "grass": _bg_grass, "snow": _bg_snow, "brick wall": _bg_brick,
    "night sky": _bg_night, "desert": _bg_desert, "forest": _bg_forest, "water": _bg_water,
    "studio": _bg_studio, "road": _bg_road,
}


# ----------------------------------------------------------------------------------------------
# Object geometry: signed distances in object-local units (negative inside), textures, marks
# ----------------------------------------------------------------------------------------------

def rot_uv(u, v, angle):
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


def shape_sdf(name: str, u, v, aspect: float, parts: Sequence[float]):
    """Object-local SDF (negative inside) of a category ``name`` and its secondary-part indicator
    (float in [0, 1]; 2 marks the house's door)."""
    p = parts
    a = aspect
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


def mark_sdf(shape: str, u, v, mu, mv, r):
    """Signed distance to a mark (dot, square or diamond) of radius r centred at (mu, mv)."""
    du, dv = u - mu, v - mv
    if shape == "dot":
        return np.hypot(du, dv) - r
    if shape == "square":
        return np.maximum(np.abs(du), np.abs(dv)) - 0.85 * r
    return (np.abs(du) + np.abs(dv)) * (1 / math.sqrt(2)) - 0.8 * r  # diamond


def texture(kind: str, f: float, ang: float, ph: float, ex: float, u, v, px: float) -> np.ndarray:
    """Pattern value in [0,1] (0 = colour A, 1 = colour B) in object-local coords: ``kind`` one of
    stripes / waves / checks / dots / rings at frequency f (cycles per object unit), angle ang,
    phase ph and extra parameter ex (dot radius, wave amplitude, ring centre) in [0, 1]."""
    ru, rv = rot_uv(u, v, ang)
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
