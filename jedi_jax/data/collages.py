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
order (row-major), become the cells' <NN>.txt sidecars; "prompt" (the collage prompt) may be there
and is ignored; any other key is an error (a typo would drop captions without a word). With
--captions, every collage needs a line. Without it: no sidecars and no class.txt (folder_sets then
captions each photo "a photo of a {class}", the class from the folder name).

Written (beside PHOTOS under a hidden temporary name, renamed into place when complete):

    PHOTOS/<subject>/<NN>.png     the cells, row-major, numbered from 00 (wider when a subject has
                                  100 or more); lossless PNG
    PHOTOS/<subject>/<NN>.txt     a cell's caption, when --captions gives them
    PHOTOS/<subject>/class.txt    the subject's class, when --captions gives one
    PHOTOS/collages.json          manifest: per collage the grid found, how (gutters / edges / given),
                                  each cell's box in the collage (x0, y0, x1, y1, before --trim),
                                  file and caption, its subject; the collages skipped; the command

Collages that name the same subject go into one folder, numbered on in the order of their file
names (their classes must agree). --overwrite replaces only an earlier output of this tool (a folder
with collages.json), once the new one is complete.

Grid (--grid): "RxC" (e.g. 2x2, 1x3) cuts every collage into R rows and C columns of equal size (the
whole image; --trim removes gutter remnants). "auto" (default) finds it per collage, each axis on its
own, on the luminance:
  1. gutters: a row (column) is uniform when its mean absolute deviation from its median is small
     (under 6 levels and under a fifth of the image's median row deviation). Uniform runs touching the
     border are outer margins and are cut off; for n = the most cells down to 2, the grid of n cells
     is taken when each of the n - 1 evenly spaced cut positions lies in (or within 2% of) a uniform
     run and the n cells between those runs are equal in size (within max(2 px, 2%)); or, when cell
     backgrounds of the gutter's colour widen the runs, when equal cells with equal gutters (as wide
     as fits) put each gutter inside its run. Border runs that may be cell background rather than
     margin are tried both ways.
  2. edges, where an axis has no such gutters (collages drawn edge to edge): the mean absolute
     gradient across each column (row), averaged over the whole height (width), is a profile; the
     columns far above its median (median + 8 MADs, and 2.5 x the median) are the strong lines. The
     grid of n cells is taken when every one of the n - 1 evenly spaced positions has a strong line
     within max(2 px, 1%) and no strong line lies anywhere else.
  Otherwise the axis has one cell. A collage with 1 x 1 cells, or whose cells would be smaller than
  --min-cell px, has no consistent grid: it is skipped with a `warning:` line naming the file and
  listed under "skipped" in the manifest (a guess would put two subjects' halves or one photo's
  quarters into a set); when every collage is skipped, that is an error. Limits: white-background
  product shots whose backgrounds touch a gutter of the same colour widen or hide it (the cells then
  come out unequal and the collage is skipped, or cut short), and a photo with one uniform band or
  one sharp straight line exactly at its middle looks like a 2-cell collage: check the --preview.

--min-cell (default 64) is the smallest cell side, in px, before --trim; --trim F (default 0.02,
< 0.25) crops F of each cell's width from its left and right and F of its height from top and bottom.

Mistakes (missing --src, no collages in it, bad --grid text, a --captions line that is no JSON object
of the keys above (its line number named), captions for a file that is not there, a collage without a
line, a caption count that differs from the cells found, --grid cells under --min-cell, two classes
for one subject, an unreadable image) end with one `error:` line and exit status 2, and nothing is
written; Ctrl-C (exit 130) leaves nothing either.
"""
from __future__ import annotations

import argparse
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

from jedi_jax.data.folder_sets import IMAGE_EXTS, UserError, _fold, _open, run_tool
from jedi_jax.sampling.images import labeled_grid, to_rgb

MANIFEST = "collages.json"
LINE_KEYS = {"file", "subject", "class", "captions", "prompt"}
PREVIEW_COLLAGES, PREVIEW_CELLS = 6, 8
UNIFORM_LEVELS, UNIFORM_RELATIVE = 6.0, 0.2  # a gutter line: mean |x - median| under both
EDGE_MADS, EDGE_TIMES_MEDIAN = 8.0, 2.5


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

def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _fit_gutters(runs: list[tuple[int, int]], lo: int, hi: int, min_cell: int) -> list[tuple[int, int]] | None:
    """Equal cells [(start, end)] in [lo, hi) cut at uniform runs, or None (see the module docstring)."""
    inner = [r for r in runs if r[0] > lo and r[1] < hi]
    extent = hi - lo
    tol = max(2.0, 0.02 * extent)
    for n in range(extent // min_cell, 1, -1):
        chosen: list[tuple[int, int]] = []
        for k in range(1, n):
            pos = lo + k * extent / n
            hit = [r for r in inner if r[0] - tol <= pos <= r[1] + tol and (not chosen or r[0] >= chosen[-1][1])]
            if not hit:
                break
            chosen.append(min(hit, key=lambda r: abs((r[0] + r[1]) / 2 - pos)))
        else:
            cells = list(zip([lo] + [r[1] for r in chosen], [r[0] for r in chosen] + [hi]))
            sizes = [b - a for a, b in cells]
            if min(sizes) >= min_cell and max(sizes) - min(sizes) <= tol:
                return cells
            # runs widened by cell backgrounds of the gutter's colour: equal cells and equal gutters, each
            # inside its run, the gutters as wide as that allows
            for g in range(min(b - a for a, b in chosen), 0, -1):
                s = (extent - (n - 1) * g) / n
                gaps = [(lo + round(k * (s + g) - g), lo + round(k * (s + g))) for k in range(1, n)]
                if s >= min_cell and all(r[0] <= a and b <= r[1] for r, (a, b) in zip(chosen, gaps)):
                    return list(zip([lo] + [b for _, b in gaps], [a for a, _ in gaps] + [hi]))
    return None


def _gutter_cuts(dev: np.ndarray, min_cell: int) -> tuple[int, int, list[tuple[int, int]] | None]:
    """(lo, hi, cells) along one axis from the per-line deviation `dev`: lo/hi bound the content inside
    the outer margins (uniform runs at the border); cells [(start, end)] split by gutters, or None when
    no gutter grid fits. Uniform runs at the border may also be cell backgrounds: the bounds without
    them are tried too."""
    size = len(dev)
    runs = _runs(dev < min(UNIFORM_LEVELS, UNIFORM_RELATIVE * max(float(np.median(dev)), 1e-6)))
    lo = runs[0][1] if runs and runs[0][0] == 0 else 0
    hi = runs[-1][0] if runs and runs[-1][1] == size else size
    if hi - lo < min_cell:
        lo, hi = 0, size  # (nearly) all uniform: no margins to speak of
    for bounds in dict.fromkeys([(lo, hi), (0, hi), (lo, size), (0, size)]):
        if bounds[1] - bounds[0] >= 2 * min_cell and (cells := _fit_gutters(runs, *bounds, min_cell)):
            return bounds[0], bounds[1], cells
    return lo, hi, None


def _edge_cuts(grad: np.ndarray, lo: int, hi: int, min_cell: int) -> list[tuple[int, int]] | None:
    """cells [(start, end)] in [lo, hi) cut at strong straight lines; grad[i] is the mean absolute
    difference between lines lo + i and lo + i + 1. None when they form no even grid."""
    if len(grad) < 3:
        return None
    med = float(np.median(grad))
    mad = float(np.median(np.abs(grad - med))) * 1.4826
    strong = np.flatnonzero(grad > max(med + EDGE_MADS * mad, EDGE_TIMES_MEDIAN * med, 2.0))
    if not len(strong):
        return None
    extent = hi - lo
    tol = max(2.0, 0.01 * extent)
    for n in range(extent // min_cell, 1, -1):
        ideal = [k * extent / n - 1 for k in range(1, n)]  # the gradient index between cells k-1 and k
        near = [strong[np.abs(strong - p) <= tol] for p in ideal]
        covered = np.zeros(len(strong), bool)
        for p in ideal:
            covered |= np.abs(strong - p) <= tol
        if all(len(s) for s in near) and covered.all():
            cuts = [lo + int(s[np.argmax(grad[s])]) + 1 for s in near]
            cells = list(zip([lo] + cuts, cuts + [hi]))
            if min(b - a for a, b in cells) >= min_cell:
                return cells
    return None


Cells = list[tuple[int, int]]  # [(start, end)] along one axis


def detect_grid(image: np.ndarray, min_cell: int = 64) -> tuple[str, Cells, Cells] | None:
    """(method, row cells [(y0, y1)], column cells [(x0, x1)]) of a collage (uint8 (H, W, 3)), found
    from gutters or, without them, strong straight lines (see the module docstring); None when it
    finds no consistent grid of at least two cells."""
    luma = image[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    found, methods = [], []
    for lines in (luma, luma.T):  # lines[i]: row i (horizontal gutters), then column i
        dev = np.abs(lines - np.median(lines, axis=1, keepdims=True)).mean(axis=1)
        lo, hi, cells = _gutter_cuts(dev, min_cell)
        method = "gutters"
        if cells is None:
            cells, method = _edge_cuts(np.abs(np.diff(lines[lo:hi], axis=0)).mean(axis=1), lo, hi, min_cell), "edges"
        if cells is not None and method not in methods:
            methods.append(method)
        found.append(cells if cells is not None else [(lo, hi)])
    rows, cols = found
    if len(rows) * len(cols) < 2 or min(b - a for a, b in rows + cols) < min_cell:
        return None
    return "+".join(methods), rows, cols


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
                                     or not all(isinstance(c, str) and _fold(c) for c in captions)):
            raise UserError(f'{where}: "captions" must be a list of non-empty strings')
        cls = row.get("class")
        if cls is not None and (not isinstance(cls, str) or not _fold(cls)):
            raise UserError(f'{where}: "class" must be a non-empty string')
        table[name] = {"line": lineno, "subject": _check_subject(row.get("subject", Path(name).stem), where),
                       "class": _fold(cls) if cls else None,
                       "captions": [_fold(c) for c in captions] if captions is not None else None}
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


def _cells_of(c: Collage, image: np.ndarray, grid: tuple[int, int] | None, min_cell: int) -> bool:
    """Sets c.grid, c.method, c.boxes; False when auto finds no grid (a UserError for RxC's mistakes)."""
    h, w = image.shape[:2]
    if grid is None:
        found = detect_grid(image, min_cell)
        if found is None:
            return False
        c.method, rows, cols = found
    else:
        rows, cols = even_cells(h, grid[0]), even_cells(w, grid[1])
        if min(b - a for a, b in rows + cols) < min_cell:
            raise UserError(f"{c.path}: --grid {grid[0]}x{grid[1]} gives {w // grid[1]}x{h // grid[0]} px cells "
                            f"of this {w}x{h} image, under --min-cell {min_cell}")
        c.method = "given"
    c.grid = (len(rows), len(cols))
    c.boxes = [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols]
    if c.captions is not None and len(c.captions) != len(c.boxes):
        raise UserError(f"{c.path}: --captions gives {len(c.captions)} caption(s) but the collage has "
                        f"{len(c.boxes)} cells ({c.grid[0]}x{c.grid[1]}, {c.method})")
    return True


def _load(path: Path) -> np.ndarray:
    return np.asarray(to_rgb(_open(path)), np.uint8)


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
    from jedi_jax.convert.param_io import atomic_directory, check_destination  # imports jax: after the checks

    check_destination(dst_p, overwrite=overwrite, marker=MANIFEST)  # before the images are read, and again below
    kept, skipped = [], []
    for c in tqdm(collages, desc="collages: grids", unit="collage", disable=None if progress else True):
        if _cells_of(c, _load(c.path), shape, min_cell):
            kept.append(c)
        else:
            skipped.append(c.path.name)
            print(f"warning: skipping {c.path}: no consistent grid found (pass --grid RxC if it is a collage)",
                  file=sys.stderr)
    if not kept:
        raise UserError(f"--src {src}: no collage has a consistent grid ({len(skipped)} skipped); "
                        "pass --grid RxC")
    counts: dict[str, int] = {}
    for c in kept:
        counts[c.subject] = counts.get(c.subject, 0) + len(c.boxes)
    manifest: dict[str, Any] = {
        "tool": "jedi_jax.data.collages", "source": str(src_p.resolve()), "grid": grid, "min_cell": min_cell,
        "trim": trim, "captions_file": str(Path(captions).absolute()) if captions else None, "collages": [],
        "skipped": skipped, "subjects": counts, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    shown: list[tuple[list[np.ndarray], list[str]]] = []
    with atomic_directory(dst_p, overwrite=overwrite, marker=MANIFEST) as tmp:
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
        grid_image = labeled_grid([r for r, _ in shown], [t for _, t in shown], cell=128) if shown else None
    if grid_image is not None:  # written once the folders are in place, under a temporary name first
        part = Path(preview).absolute().with_name(f".{Path(preview).name}.part-{os.getpid()}")
        try:
            grid_image.save(part, format="PNG")
            os.replace(part, preview)
        finally:
            part.unlink(missing_ok=True)
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
    skipped = f" ({len(m['skipped'])} skipped: no grid)" if m["skipped"] else ""
    print(f"collages: {len(m['collages'])} collages{skipped} -> {cells} photos of {len(m['subjects'])} subjects -> "
          f"{Path(args.dst).absolute()} in {m['seconds']:.1f} s; next: python -m jedi_jax.data.folder_sets "
          f"--src {shlex.quote(str(Path(args.dst).absolute()))} --dst SETS --resolution 512")
    return 0


if __name__ == "__main__":
    sys.exit(main())
