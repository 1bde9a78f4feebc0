r"""Splits photo collages of one subject each into the photo folders `jedi_jax.data.folder_sets` reads.

JeDi's training data S3 (Zeng et al., "JeDi: Joint-Image Diffusion Models for Finetuning-Free
Personalized Text-to-Image Generation", CVPR 2024, Sec. 3) comes from a text-to-image model prompted
for PHOTO COLLAGES of one subject ("a photo collage of 4 photos of the same red backpack, in a park,
on a desk, ..."), with subject and scene descriptions written by an LLM; the collages are split into
single images, which become one same-subject set. This tool is the split. The whole path:

    python -m jedi_jax.data.collages --src COLLAGES --dst PHOTOS --captions prompts.jsonl
    python -m jedi_jax.data.folder_sets --src PHOTOS --dst SETS --resolution 512
    python -m jedi_jax.train --config configs/sd15.py --workdir runs/s3 \
        --config.data.source=array_record:SETS/train.array_record --config.data.hflip=0.5

Usage:

    python -m jedi_jax.data.collages --src COLLAGES --dst PHOTOS [--grid auto|RxC] \
        [--captions FILE.jsonl] [--min-cell 64] [--trim 0.02] [--overwrite] [--preview PNG]

Read: COLLAGES/<file>.{jpg,jpeg,png,webp} (any case of the ending), one subject a collage; names
starting with "." and anything else (sub-folders, other files) are skipped. --captions FILE.jsonl, a
line a collage (what an LLM-written S3 prompt list gives):

    {"file": "c001.png", "subject": "red_backpack", "class": "backpack",
     "captions": ["a red backpack in a park", "a red backpack on a desk", ...]}

"file" (the collage's file name, or its stem) is required; "subject" names the output folder (default:
the collage's stem); "class" is written as the folder's class.txt; "captions", in the cells' reading
order (row-major), become the cells' <NN>.txt sidecars, and under --grid auto their count is the
number of cells the collage must have; "prompt" (the collage prompt) may be there and is ignored; any
other key is an error (a typo would drop captions without a word). With --captions, every collage
needs a line. Without it: no sidecars and no class.txt, and the folder is the collage's file stem,
which folder_sets turns into the class ("a photo of a {class}", trailing digits dropped, "_" and "-"
read as spaces): name the collages by subject (red_backpack.png -> "a photo of a red backpack"), or
pass --captions; c001.png would give "a photo of a c".

Written (beside PHOTOS under a hidden temporary name, renamed into place when complete):

    PHOTOS/<subject>/<NN>.png     the cells, row-major, numbered from 00 (wider when a subject has
                                  100 or more); lossless PNG
    PHOTOS/<subject>/<NN>.txt     a cell's caption, when --captions gives them
    PHOTOS/<subject>/class.txt    the subject's class, when --captions gives one
    PHOTOS/collages.json          manifest: per collage the grid found, how (gutters / given),
                                  each cell's box in the collage (x0, y0, x1, y1, before --trim),
                                  file and caption, its subject; the collages skipped and why;
                                  the command

Collages that name the same subject go into one folder, numbered on in the order of their file
names (their classes must agree). --overwrite replaces only an earlier output of this tool (a folder
with collages.json), once the new one is complete.

Grid (--grid): "RxC" (e.g. 2x2, 1x3) cuts every collage into R rows and C columns of equal size (the
whole image; --trim removes gutter remnants). "auto" (default) cuts only where GUTTERS determine the
grid, and skips the collage otherwise; a grid is never guessed. Per axis, on the luminance:
  1. a line (row or column) is uniform when its mean absolute deviation from a quadratic trend along
     it is small (under 6 levels and under a fifth of the median line's), so flat and shaded (200 ->
     255) gutters both count. Uniform runs at the border are outer margins, the others gutters.
  2. a grid is n equal cells with n - 1 equal gutters of >= 1 line, each gutter inside a uniform run,
     the margins inside the border runs. A run's edge is a photo's edge when >= 30% of the next line
     differs from the run by > 16 levels; such an edge is a cell edge. The gutters are all interior
     runs of >= 2 lines, or for n cells the run nearest each evenly spaced cut. Of the grids that fit,
     every cell edge not at a photo's edge must be determined within the tolerance, max(2 px, 2% of a
     cell) (so white-background photos whose white meets white gutters or margins are skipped unless
     the other cells pin the grid); the cells must be equal within it, at least --min-cell, and cover
     >= 90% of the span from the first cell to the last; where an outer cell reaches into a border
     run, the two outer margins may differ by at most max(tolerance, twice the widest gutter) (else
     it is photo background taken for margin on one side). An axis without
     interior runs of >= 2 lines is one cell; an axis with such runs and no grid that fits means skip
     (never "one cell on that axis").
  3. the whole collage: the finest grid the gutters allow is the one taken (a coarser one would put
     two photos in a cell); with --captions, when its cell count differs from the caption count the
     collage is skipped, both counts named; 1 x 1 (no gutters at all, e.g. a collage drawn edge to edge) is
     skipped with a hint to pass --grid RxC; the same gutter test inside each row and column of cells
     must not find more cells there (one big photo beside two small ones), nor an uniform run at an
     even cut without a grid; and along an axis of one cell, a sharp straight line crossing every cell
     at the same evenly spaced place (photos stacked edge to edge, their gutter missing) means skip.
     Such lines only ever skip a collage, never cut it.
A skipped collage gets a `warning:` line naming the file and why, and is listed under "skipped" in
the manifest; when every collage is skipped, that is an error. Limits: collages drawn edge to edge
need --grid RxC; white-background product shots on white (or any gutter colour matching the photos'
backgrounds) are often skipped; a photo with a uniform band of >= 2 lines at an even cut in one cell
gets its collage skipped; a gutter that is not uniform (a pattern, a texture) is not found; a photo
whose gutter-coloured background reaches one edge in every cell in the same way can still move that
edge within the tolerance. Check the --preview.

--min-cell (default 64) is the smallest cell side, in px, before --trim; --trim F (default 0.02,
< 0.25) crops F of each cell's width from its left and right and F of its height from top and bottom.

Mistakes (missing --src, no collages in it, bad --grid text, a --captions line that is no JSON object
of the keys above (its line number named), captions for a file that is not there, a collage without a
line, a caption count that differs from --grid RxC's cells, --grid cells under --min-cell, two classes
for one subject, an unreadable image) end with one `error:` line and exit status 2, and nothing is
written; Ctrl-C (exit 130) leaves nothing either.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from jedi_jax.data.folder_sets import IMAGE_EXTS, UserError, fold_whitespace, open_photo, run_tool
from jedi_jax.sampling.images import labeled_grid, to_rgb

MANIFEST = "collages.json"
LINE_KEYS = {"file", "subject", "class", "captions", "prompt"}
PREVIEW_COLLAGES, PREVIEW_CELLS = 6, 8
UNIFORM_LEVELS, UNIFORM_RELATIVE = 6.0, 0.2  # a gutter line: mean |x - trend| under both (the 2nd x the median line's)
UNIFORM_FLOOR = 0.05  # ... and never a limit below this: when most lines are flat margin, the median line is ~0
TOLERANCE, COVERAGE = 0.02, 0.9  # cells equal within 2% of a cell (>= 2 px); cells >= 90% of the span
PIN_LEVELS, PIN_FRACTION = 16.0, 0.3  # a photo's edge: >= 30% of the line differs from the gutter by > 16 levels
SEAM_LEVELS, SEAM_FRACTION, SEAM_MARGIN = 24.0, 0.5, 0.1  # a sharp line: that share of pixels differs by > 24


@dataclasses.dataclass
class Collage:
    path: Path
    subject: str
    cls: str | None = None
    captions: list[str] | None = None
    grid: tuple[int, int] | None = None  # rows, columns
    method: str = ""
    boxes: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)  # x0, y0, x1, y1


def parse_grid(text: str) -> tuple[int, int] | None:
    """"auto" -> None; "RxC" -> (R, C), both >= 1; else UserError."""
    if text == "auto":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"--grid {text!r} must be auto or ROWSxCOLUMNS with both at least 1 (e.g. 2x2, 1x3)")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------- detection

Cells = list[tuple[int, int]]  # [(start, end)] along one axis


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def line_deviation(lines: np.ndarray) -> np.ndarray:
    """Per line (row of `lines`): the mean |x - trend|, the trend a least-squares quadratic along the
    line, so that a gutter shaded along its length (200 -> 255) is as uniform as a flat one."""
    t = np.linspace(-1.0, 1.0, lines.shape[1], dtype=np.float32)
    basis = np.stack([np.ones_like(t), t, t * t], axis=1)
    return np.abs(lines - (lines @ np.linalg.pinv(basis).T) @ basis.T).mean(axis=1)


def _pinned(lines: np.ndarray, run_line: int, content_line: int) -> bool:
    """Whether the content line next to a uniform run is a photo's edge (most of it differs from the
    run), not a subject on a background of the run's colour that merely touches the run."""
    return float((np.abs(lines[content_line] - lines[run_line]) > PIN_LEVELS).mean()) >= PIN_FRACTION


def _solve(gutters: list[tuple[int, int]], bounds: tuple[int, int, int], pins: dict[int, bool], min_cell: int,
           slack: float, use_pins: bool = True) -> tuple[Cells, float] | None:
    """Equal cells of size s between equal gutters of g >= 1 lines, each gutter inside its run
    (within `slack` lines), the outer margins inside the border runs; a run edge that is a photo's edge
    (pins) is a cell edge. Returns (cells, spread) -- a pinned cell edge is its run edge, any other
    the middle of what the constraints allow, spread the most any such edge can move -- or None when
    no such grid exists."""
    lo_run, hi_run, size = bounds  # content lies in [lo_run, hi_run): the border runs are [0, lo_run), [hi_run, size)
    n = len(gutters) + 1
    p = slack + 1e-6
    pins = pins if use_pins else dict.fromkeys(pins, False)
    lo_pinned = lo_run == 0 or pins[lo_run]
    hi_pinned = hi_run == size or pins[hi_run]
    los = np.arange(max(0, int(np.floor(lo_run - p))) if lo_pinned else 0, int(np.floor(lo_run + p)) + 1, dtype=float)
    g_max = min(b - a for a, b in gutters) + int(2 * slack) if gutters else 1
    gs = np.arange(1, max(g_max, 1) + 1, dtype=float) if gutters else np.zeros(1)
    lo, g = los[:, None], gs[None, :]
    s_min = np.full(lo.shape[:1] + g.shape[1:], float(min_cell))
    s_max = np.full_like(s_min, np.inf)
    for k, (a, b) in enumerate(gutters, 1):  # gutter k: [lo + k s + (k-1) g, lo + k s + k g)
        s_min = np.maximum(s_min, (a - p - lo - (k - 1) * g) / k)
        s_max = np.minimum(s_max, (b + p - lo - k * g) / k)
        if pins[a]:
            s_max = np.minimum(s_max, (a + p - lo - (k - 1) * g) / k)
        if pins[b]:
            s_min = np.maximum(s_min, (b - p - lo - k * g) / k)
    s_min = np.maximum(s_min, (hi_run - p - lo - (n - 1) * g) / n)  # hi = lo + n s + (n-1) g
    hi_max = min(size, hi_run + p) if hi_pinned else size
    s_max = np.minimum(s_max, (hi_max - lo - (n - 1) * g) / n)
    ok = s_min <= s_max
    if not ok.any():
        return None
    lo_f, g_f = np.broadcast_to(lo, ok.shape)[ok], np.broadcast_to(g, ok.shape)[ok]

    def edges(s: np.ndarray, lo: np.ndarray, g: np.ndarray) -> np.ndarray:  # (points, 2n): starts, then ends
        starts = lo[:, None] + np.arange(n)[None, :] * (s + g)[:, None]
        return np.concatenate([starts, starts + s[:, None]], axis=1)

    every = np.concatenate([edges(s_min[ok], lo_f, g_f), edges(s_max[ok], lo_f, g_f)])
    low, high = every.min(axis=0), every.max(axis=0)
    widest = np.flatnonzero(g_f == g_f.max())  # of the grids that fit, one with the widest gutters
    pick = widest[len(widest) // 2]
    chosen = edges(np.array([(s_min[ok][pick] + s_max[ok][pick]) / 2]), lo_f[pick:pick + 1], g_f[pick:pick + 1])[0]
    runs_at = [lo_run] + [b for _, b in gutters] + [a for a, _ in gutters] + [hi_run]  # starts, then ends
    pinned = [lo_pinned] + [pins[b] for _, b in gutters] + [pins[a] for a, _ in gutters] + [hi_pinned]
    final, spread = [], 0.0
    for j, (at, pin) in enumerate(zip(runs_at, pinned)):
        if pin and low[j] - 0.5 <= at <= high[j] + 0.5:
            final.append(at)
            continue
        final.append(int(round(chosen[j])))
        spread = max(spread, float(high[j] - low[j]))
    return list(zip(final[:n], final[n:])), spread


def uniform_limit(dev: np.ndarray) -> float:
    """The deviation below which a line (dev[i]: line_deviation) counts as uniform: a fifth of the
    median line's, at most UNIFORM_LEVELS, at least UNIFORM_FLOOR (flat margins over most of the
    axis make the median ~0, float rounding above it, and no margin line would count)."""
    return min(UNIFORM_LEVELS, max(UNIFORM_RELATIVE * float(np.median(dev)), UNIFORM_FLOOR))


def _axis_fits(lines: np.ndarray, min_cell: int) -> list[Cells] | str:
    """The cell grids [(start, end)] along one axis (lines[i]: line i across the collage) that its
    uniform runs determine, most cells first; a str says why there is none (see the module docstring)."""
    size = lines.shape[0]
    dev = line_deviation(lines)
    runs = _runs(dev < uniform_limit(dev))
    if runs == [(0, size)]:
        return "it is blank"
    lo_run = runs[0][1] if runs and runs[0][0] == 0 else 0
    hi_run = runs[-1][0] if runs and runs[-1][1] == size else size
    interior = [r for r in runs if r[0] > 0 and r[1] < size]
    pins: dict[int, bool] = {}
    for a, b in runs:
        if a > 0:
            pins[a] = _pinned(lines, a, a - 1)
        if b < size:
            pins[b] = _pinned(lines, b - 1, b)
    evidence = [r for r in interior if r[1] - r[0] >= 2]  # one uniform line is common inside a photo
    # which runs are the gutters: all of them, or for n cells the one nearest each evenly spaced cut
    candidates = [evidence, interior] if evidence else [[], interior]
    for n in range(2, (hi_run - lo_run) // min_cell + 1):
        step, chosen = (hi_run - lo_run) / n, []
        for k in range(1, n):
            pos = lo_run + k * step
            near = [r for r in interior if r[0] - step / 4 <= pos <= r[1] + step / 4
                    and (not chosen or r[0] >= chosen[-1][1])]
            if not near:
                break
            chosen.append(min(near, key=lambda r: abs((r[0] + r[1]) / 2 - pos)))
        else:
            candidates.append(chosen)
    fits, why = [], ""
    for gutters in dict.fromkeys(map(tuple, candidates)):
        gutters = list(gutters)
        n = len(gutters) + 1
        inner = hi_run - lo_run - sum(b - a for a, b in gutters)
        tol = max(2.0, TOLERANCE * inner / n)
        bounds = (lo_run, hi_run, size)
        solved = None  # a straight edge inside a photo pins wrongly: then without the pins
        for use_pins, slack in ((True, 0.0), (True, tol / 2), (False, 0.0), (False, tol / 2)):
            if (x := _solve(gutters, bounds, pins, min_cell, slack, use_pins)) is not None:
                solved = solved or x
                if x[1] <= tol + 0.01:
                    solved = x
                    break
        if solved is None:
            why = why or f"no {n} equal cells of at least --min-cell {min_cell} px fit its {n - 1} uniform band(s)"
            continue
        cells, spread = solved
        sizes = [b - a for a, b in cells]
        if spread > tol + 0.01:
            why = why or (f"where its {n} cells start and end is not determined (cell backgrounds of the "
                          f"gutter's colour hide the gutters or margins)")
        elif max(sizes) - min(sizes) > tol or min(sizes) < min_cell:
            why = why or f"its {n} cells are unequal ({min(sizes)} to {max(sizes)} px)"
        elif sum(sizes) < COVERAGE * (cells[-1][1] - cells[0][0]):
            why = why or f"its {n} cells cover under {COVERAGE:.0%} of it (gutters wider than photos allow)"
        elif cells[0][0] < 0 or cells[-1][1] > size:
            why = why or "its cells would reach past its border"
        elif (cells[0][0] != lo_run or cells[-1][1] != hi_run) and abs(cells[0][0] - (size - cells[-1][1])) > \
                max(tol, 2 * max([b - a for (_, a), (b, _) in zip(cells, cells[1:])], default=0)):
            why = why or (f"its outer margins would be {cells[0][0]} and {size - cells[-1][1]} px, photo "
                          "background taken for margin on one side (cells of unequal size?)")
        else:
            fits.append(cells)
    # more than one cell first, then the most equal cells, then the most cells
    fits.sort(key=lambda c: (len(c) == 1, (max(b - a for a, b in c) - min(b - a for a, b in c)) / (c[0][1] - c[0][0]), -len(c)))
    return fits or why


def _at_a_cut(a: int, b: int, size: int, min_cell: int) -> bool:
    """Whether [a, b) holds a cut of [0, size) into m equal parts (m >= 2), within 2% of a part."""
    return any(a - max(2.0, TOLERANCE * size / m) <= j * size / m <= b + max(2.0, TOLERANCE * size / m)
               for m in range(2, size // min_cell + 1) for j in range(1, m))


def _split_band(luma: np.ndarray, rows: Cells, cols: Cells, min_cell: int) -> str | None:
    """The gutter test again inside each column of cells (and each row): a column that its own gutters
    split into more cells than the whole collage has rows holds photos of other sizes (one big photo
    beside two small ones), so the grid is wrong: why, or None."""
    for (lines, along, across, what) in ((luma, rows, cols, "column"), (luma.T, cols, rows, "row")):
        for a, b in across:
            band = lines[along[0][0]:along[-1][1], a:b]
            fits = _axis_fits(band, min_cell)
            if isinstance(fits, str):  # uniform runs but no grid: one at an even cut is a gutter of its own
                dev = line_deviation(band)
                limit = uniform_limit(dev)
                for y0, y1 in along:
                    inner = [(r0, r1) for r0, r1 in _runs(dev[y0 - along[0][0]:y1 - along[0][0]] < limit)
                             if r0 >= min_cell and y1 - y0 - r1 >= min_cell and r1 - r0 >= 2]
                    if any(_at_a_cut(r0, r1, y1 - y0, min_cell) for r0, r1 in inner):
                        return f"the {what} of cells at {a}-{b}: {fits}"
            elif len(fits[0]) > len(along):
                return (f"the {what} of cells at {a}-{b} splits into {len(fits[0])} cells, the collage into "
                        f"{len(along)}: photos of unequal size")
    return None


def _seam(luma: np.ndarray, one: tuple[int, int], others: Cells, min_cell: int) -> bool:
    """Whether every cell along an axis found to hold one cell shows a sharp straight line at the same
    evenly spaced positions: photos drawn edge to edge along it, their gutter missing."""
    lo, hi = one
    extent = hi - lo
    tol = max(2, round(TOLERANCE * extent / 2))
    strengths = []
    for a, b in others:
        diff = np.abs(np.diff(luma[lo:hi, a:b], axis=0)) > SEAM_LEVELS
        frac = diff.mean(axis=1)
        strengths.append((frac, float(np.quantile(frac, 0.98))))
    for n in range(2, extent // min_cell + 1):
        def strong(k: int) -> bool:
            p = round(k * extent / n) - 1
            window = slice(max(0, p - tol), p + tol + 1)
            return all(frac[window].max() >= max(SEAM_FRACTION, q + SEAM_MARGIN) for frac, q in strengths)
        if all(strong(k) for k in range(1, n)):
            return True
    return False


def detect_grid(image: np.ndarray, min_cell: int = 64, cells: int | None = None) -> tuple[Cells, Cells] | str:
    """(row cells [(y0, y1)], column cells [(x0, x1)]) of a collage (uint8 (H, W, 3)) split by gutters,
    or why it has no determined grid (a str); `cells`, when given (the caption count), is the number of
    cells the grid must have. See the module docstring."""
    luma = image[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    rows_fit, cols_fit = _axis_fits(luma, min_cell), _axis_fits(luma.T, min_cell)
    for fit, what in ((rows_fit, "rows"), (cols_fit, "columns")):
        if isinstance(fit, str):
            return f"its {what}: {fit}"
    pairs = [(r, c) for r in rows_fit for c in cols_fit if len(r) * len(c) >= 2]
    if not pairs:
        return "no gutters found (a collage drawn edge to edge needs --grid RxC)"
    rows, cols = pairs[0]  # the finest grid the gutters allow: a coarser one would put 2+ photos in a cell
    if cells is not None and len(rows) * len(cols) != cells:
        return (f"--captions gives {cells} caption(s) but the grid found has {len(rows) * len(cols)} cells "
                f"({len(rows)}x{len(cols)})")
    if (why := _split_band(luma, rows, cols, min_cell)) is not None:
        return why
    if len(rows) == 1 and _seam(luma, rows[0], cols, min_cell) or \
            len(cols) == 1 and _seam(luma.T, cols[0], rows, min_cell):
        return ("a sharp straight line crosses every cell at the same place, as where photos drawn edge to "
                "edge meet (pass --grid RxC)")
    return rows, cols


def even_cells(size: int, n: int) -> list[tuple[int, int]]:
    cuts = [round(k * size / n) for k in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def trimmed(cell: np.ndarray, trim: float) -> np.ndarray:
    h, w = cell.shape[:2]
    ty, tx = round(trim * h), round(trim * w)
    return cell[ty:h - ty, tx:w - tx]


# ------------------------------------------------------------------------------------------ inputs

def _check_subject(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or name.startswith(".") \
            or any(c in name for c in "/\\\0") or name == MANIFEST:
        raise UserError(f"{where}: subject {name!r} is no folder name (not empty, no leading dot or "
                        f"surrounding spaces, no slashes, not {MANIFEST})")
    return name


def read_captions(path: str | os.PathLike, files: dict[str, Path]) -> dict[str, dict]:
    """{collage file name: line} of a --captions JSONL, each line checked (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--captions {path}: cannot read it ({type(e).__name__})") from e
    by_stem = {p.stem: name for name, p in files.items()}
    table: dict[str, dict] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--captions {path} line {lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where} is no JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise UserError(f'{where} is no JSON object with a "file" name')
        if extra := sorted(set(row) - LINE_KEYS):
            raise UserError(f"{where} has unknown key(s) {', '.join(map(repr, extra))} "
                            f"(known: {', '.join(sorted(LINE_KEYS))})")
        name = row["file"] if row["file"] in files else by_stem.get(row["file"])
        if name is None:
            raise UserError(f"{where} names {row['file']!r}, which is no collage in --src")
        if name in table:
            raise UserError(f"{where} names {name!r} again (line {table[name]['line']})")
        captions = row.get("captions")
        if captions is not None and (not isinstance(captions, list)
                                     or not all(isinstance(c, str) and fold_whitespace(c) for c in captions)):
            raise UserError(f'{where}: "captions" must be a list of non-empty strings')
        cls = row.get("class")
        if cls is not None and (not isinstance(cls, str) or not fold_whitespace(cls)):
            raise UserError(f'{where}: "class" must be a non-empty string')
        table[name] = {"line": lineno, "subject": _check_subject(row.get("subject", Path(name).stem), where),
                       "class": fold_whitespace(cls) if cls else None,
                       "captions": [fold_whitespace(c) for c in captions] if captions is not None else None}
    return table


def scan(src: Path, captions_file: str | None) -> list[Collage]:
    """The collages of `src` (sorted by file name), with their subjects, classes and captions."""
    if not src.exists():
        raise UserError(f"--src {src} does not exist")
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder")
    files = {p.name: p for p in sorted(src.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS}
    if not files:
        raise UserError(f"--src {src} holds no collage images ({', '.join(IMAGE_EXTS)})")
    stems: dict[str, str] = {}
    for name, p in files.items():
        if p.stem in stems:
            raise UserError(f"--src {src}: {stems[p.stem]} and {name} share the name {p.stem!r}: rename one")
        stems[p.stem] = name
    table = read_captions(captions_file, files) if captions_file else {}
    if captions_file and (missing := [n for n in files if n not in table]):
        raise UserError(f"--captions {captions_file} has no line for {len(missing)} collage(s): "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    collages = []
    classes: dict[str, tuple[str, str]] = {}
    for name, p in files.items():
        row = table.get(name, {})
        subject = row.get("subject") or _check_subject(p.stem, str(p))
        if (cls := row.get("class")) and classes.setdefault(subject, (cls, name))[0] != cls:
            raise UserError(f"subject {subject!r} has two classes: {classes[subject][0]!r} "
                            f"({classes[subject][1]}) and {cls!r} ({name})")
        collages.append(Collage(p, subject, cls, row.get("captions")))
    for c in collages:  # a subject's class.txt, whichever of its collages gives it (and is kept)
        c.cls = classes.get(c.subject, (None,))[0]
    return collages


def _cells_of(c: Collage, image: np.ndarray, grid: tuple[int, int] | None, min_cell: int) -> str | None:
    """Sets c.grid, c.method, c.boxes; under auto, returns why the collage is skipped instead (a
    UserError for RxC's mistakes)."""
    h, w = image.shape[:2]
    if grid is None:
        found = detect_grid(image, min_cell, None if c.captions is None else len(c.captions))
        if isinstance(found, str):
            return found
        (rows, cols), c.method = found, "gutters"
    else:
        rows, cols = even_cells(h, grid[0]), even_cells(w, grid[1])
        if min(b - a for a, b in rows + cols) < min_cell:
            raise UserError(f"{c.path}: --grid {grid[0]}x{grid[1]} gives {w // grid[1]}x{h // grid[0]} px cells "
                            f"of this {w}x{h} image, under --min-cell {min_cell}")
        c.method = "given"
        if c.captions is not None and len(c.captions) != grid[0] * grid[1]:
            raise UserError(f"{c.path}: --captions gives {len(c.captions)} caption(s) but --grid "
                            f"{grid[0]}x{grid[1]} cuts {grid[0] * grid[1]} cells")
    c.grid = (len(rows), len(cols))
    c.boxes = [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols]
    return None


def _load(path: Path) -> np.ndarray:
    return np.asarray(to_rgb(open_photo(path)), np.uint8)


# ------------------------------------------------------------------------------------------- build

def build(src: str | os.PathLike, dst: str | os.PathLike, *, grid: str = "auto", captions: str | None = None,
          min_cell: int = 64, trim: float = 0.02, overwrite: bool = False, preview: str | None = None,
          command: str = "", progress: bool = True) -> dict:
    """Writes PHOTOS (see the module docstring) atomically; returns the manifest. UserError on mistakes."""
    shape = parse_grid(grid)
    if min_cell < 1:
        raise UserError(f"--min-cell must be >= 1, got {min_cell}")
    if not 0 <= trim < 0.25:
        raise UserError(f"--trim must be in [0, 0.25), got {trim}")
    src_p, dst_p = Path(src).absolute(), Path(dst).absolute()
    real_src, real_dst = src_p.resolve(), dst_p.resolve()
    if real_src == real_dst or real_src in real_dst.parents or real_dst in real_src.parents:
        raise UserError(f"--dst {dst} and --src {src} must not hold one another")
    if preview is not None and (not preview.lower().endswith(".png") or not Path(preview).absolute().parent.is_dir()):
        raise UserError(f"--preview {preview} must be a .png file in an existing folder")
    start = time.time()
    collages = scan(src_p, captions)
    from jedi_jax.convert.param_io import atomic_directory, atomic_file, check_destination  # imports jax: after the checks

    check_destination(dst_p, overwrite=overwrite, marker=MANIFEST)  # before the images are read, and again below
    kept, skipped = [], []
    for c in tqdm(collages, desc="collages: grids", unit="collage", disable=None if progress else True):
        if (why := _cells_of(c, _load(c.path), shape, min_cell)) is None:
            kept.append(c)
        else:
            skipped.append({"file": c.path.name, "why": why})
            print(f"warning: skipping {c.path}: {why}", file=sys.stderr)
    if not kept:
        raise UserError(f"--src {src}: no collage has a determined grid ({len(skipped)} skipped); "
                        "pass --grid RxC")
    counts: dict[str, int] = {}
    for c in kept:
        counts[c.subject] = counts.get(c.subject, 0) + len(c.boxes)
    manifest: dict[str, Any] = {
        "tool": "jedi_jax.data.collages", "source": str(src_p.resolve()), "grid": grid, "min_cell": min_cell,
        "trim": trim, "captions_file": str(Path(captions).absolute()) if captions else None, "collages": [],
        "skipped": skipped, "subjects": counts, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    shown: list[tuple[list[np.ndarray], list[str]]] = []
    # the preview is renamed into place after the folders, and only if they were
    with (atomic_file(preview) if preview is not None else contextlib.nullcontext()) as part, \
            atomic_directory(dst_p, overwrite=overwrite, marker=MANIFEST) as tmp:
        numbered = dict.fromkeys(counts, 0)
        for c in tqdm(kept, desc="collages: cells", unit="collage", disable=None if progress else True):
            image, folder = _load(c.path), tmp / c.subject
            folder.mkdir(exist_ok=True)
            if c.cls:
                (folder / "class.txt").write_text(c.cls + "\n")
            width = max(2, len(str(counts[c.subject] - 1)))
            entry = {"file": c.path.name, "subject": c.subject, "grid": f"{c.grid[0]}x{c.grid[1]}",
                     "method": c.method, "cells": []}
            cells, labels = [], []
            for j, (x0, y0, x1, y1) in enumerate(c.boxes):
                stem = f"{numbered[c.subject]:0{width}d}"
                numbered[c.subject] += 1
                cells.append(trimmed(image[y0:y1, x0:x1], trim))
                Image.fromarray(cells[-1]).save(folder / f"{stem}.png")
                caption = c.captions[j] if c.captions is not None else None
                if caption is not None:
                    (folder / f"{stem}.txt").write_text(caption + "\n")
                entry["cells"].append({"file": f"{c.subject}/{stem}.png", "box": [x0, y0, x1, y1], "caption": caption})
                labels.append(f"[{c.path.name} {entry['grid']}] " * (j == 0) + (caption or f"{c.subject}/{stem}"))
            manifest["collages"].append(entry)
            if preview is not None and len(shown) < PREVIEW_COLLAGES:
                shown.append((cells[:PREVIEW_CELLS], labels[:PREVIEW_CELLS]))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if part is not None and shown:  # inside the block: an error or Ctrl-C here leaves nothing
            labeled_grid([r for r, _ in shown], [t for _, t in shown], cell=128).save(part, format="PNG")
    manifest["seconds"] = round(time.time() - start, 2)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.data.collages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder of collage images, one subject each")
    p.add_argument("--dst", required=True, help="output photo folders (must not exist, unless --overwrite)")
    p.add_argument("--grid", default="auto", help="auto (find each collage's grid) or RxC, e.g. 2x2")
    p.add_argument("--captions", default=None, metavar="FILE.jsonl",
                   help='a line a collage: {"file", "subject", "class", "captions"}')
    p.add_argument("--min-cell", type=int, default=64, help="smallest cell side in px (before --trim)")
    p.add_argument("--trim", type=float, default=0.02, help="fraction of each cell side cropped (gutter remnants)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output once the new one is done")
    p.add_argument("--preview", default=None, metavar="PNG", help="also write a grid of the first collages' cells")
    args = p.parse_args(argv)
    rc, m = run_tool(p.prog, argv, lambda command: build(
        args.src, args.dst, grid=args.grid, captions=args.captions, min_cell=args.min_cell, trim=args.trim,
        overwrite=args.overwrite, preview=args.preview, command=command))
    if rc:
        return rc
    cells = sum(len(c["cells"]) for c in m["collages"])
    skipped = f" ({len(m['skipped'])} skipped: no determined grid)" if m["skipped"] else ""
    print(f"collages: {len(m['collages'])} collages{skipped} -> {cells} photos of {len(m['subjects'])} subjects -> "
          f"{Path(args.dst).absolute()} in {m['seconds']:.1f} s; next: python -m jedi_jax.data.folder_sets "
          f"--src {shlex.quote(str(Path(args.dst).absolute()))} --dst SETS --resolution 512")
    return 0


if __name__ == "__main__":
    sys.exit(main())
