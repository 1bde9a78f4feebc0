"""python -m jedi_jax.data.collages: S3-style photo collages -> the photo folders folder_sets reads.

Hermetic: synthetic collages of known seeded tiles (blocky pictures) in 2x2, 1x3 and 3x2 layouts,
white and black gutters of 2-8 px, outer margins, some saved as JPEG (quality 85), one without
gutters, one noise picture; and the review's failure cases built from the repo's DreamBench photos
(tests/data/dreambench: a dog photo, a red cartoon on white): each is cut exactly or skipped, never
cut wrong. Run in-process through main(); one subprocess checks a real command line's exit status
and stderr."""
import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jedi_jax.data import collages, folder_sets
from jedi_jax.data.set_source import ArrayRecordSetSource

REPO = Path(__file__).resolve().parents[1]
TRIM = 0.02


def tile(seed, h, w, block=16):
    """A blocky random picture with mild colour (survives JPEG's chroma subsampling within a few levels)."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(40, 216, (h // block + 1, w // block + 1, 1))
    a = np.clip(grey + rng.integers(-25, 26, grey.shape[:2] + (3,)), 0, 255).astype(np.uint8)
    return np.kron(a, np.ones((block, block, 1), np.uint8))[:h, :w]


def smooth_tile(seed, h, w):
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR))


@functools.lru_cache(maxsize=None)
def photos(side=96):
    """Real photos as side x side tiles: four crops of the dog photo, the two red cartoons on white."""
    folder = REPO / "tests" / "data" / "dreambench"
    dog = Image.open(folder / "dog_04.jpg").convert("RGB")
    w, h = dog.size
    dogs = [np.asarray(dog.crop(box).resize((side, side), Image.BICUBIC)) for box in
            [(0, 0, w, h), (0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (w // 4, h // 2, 3 * w // 4, h)]]
    cartoons = [np.asarray(Image.open(folder / f"red_cartoon_0{i}.jpg").convert("RGB").resize((side, side), Image.BICUBIC))
                for i in (0, 1)]
    return dogs, cartoons


def photo_collage(tiles, rows, cols, gutters=(0, 0), colour=255, margins=(0, 0, 0, 0)):
    """(image, boxes (x0, y0, x1, y1) row-major) of equal tiles; gutters (between rows, between
    columns); margins (left, top, right, bottom)."""
    th, tw = tiles[0].shape[:2]
    (gy, gx), (left, top, right, bottom) = gutters, margins
    image = np.full((top + bottom + rows * th + (rows - 1) * gy, left + right + cols * tw + (cols - 1) * gx, 3),
                    colour, np.uint8)
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y, x = top + i * (th + gy), left + j * (tw + gx)
            image[y:y + th, x:x + tw] = tiles[i * cols + j]
            boxes.append((x, y, x + tw, y + th))
    return image, boxes


def exact_or_skipped(image, boxes, cells=None):
    """"exact" or "skipped" (the reason must be a str); anything else fails."""
    got = collages.detect_grid(image, 32, cells)
    if isinstance(got, str):
        return "skipped"
    rows, cols = got
    assert [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols] == boxes, "a wrong cut"
    return "exact"


def make_collage(rows, cols, th, tw, gutter=0, colour=255, margin=0, seed=0, tiles=tile):
    """(image, boxes (x0, y0, x1, y1) row-major, tiles)."""
    h, w = rows * th + (rows - 1) * gutter + 2 * margin, cols * tw + (cols - 1) * gutter + 2 * margin
    image = np.full((h, w, 3), colour, np.uint8)
    boxes, parts = [], []
    for r in range(rows):
        for c in range(cols):
            y, x = margin + r * (th + gutter), margin + c * (tw + gutter)
            part = tiles(1000 * seed + r * cols + c, th, tw)
            image[y:y + th, x:x + tw] = part
            boxes.append((x, y, x + tw, y + th))
            parts.append(part)
    return image, boxes, parts


def save(image, path):
    if path.suffix == ".jpg":
        Image.fromarray(image).save(path, quality=85)
    else:
        Image.fromarray(image).save(path)
    return path


def jpeg(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=85)
    return np.asarray(Image.open(buf).convert("RGB"))


def trimmed(a):
    h, w = a.shape[:2]
    ty, tx = round(TRIM * h), round(TRIM * w)
    return a[ty:h - ty, tx:w - tx]


# name (named by subject: without --captions the folder name gives the class): (rows, cols, tile h,
# tile w, gutter, colour, margin)
LAYOUTS = {"backpack.png": (2, 2, 80, 72, 4, 255, 0), "cat.jpg": (1, 3, 96, 80, 2, 0, 0),
           "clock.png": (3, 2, 70, 90, 8, 255, 6), "dog.jpg": (2, 2, 66, 66, 3, 0, 3),
           "vase.jpg": (3, 2, 72, 64, 6, 255, 0)}


def make_src(root, layouts=LAYOUTS, noise=True):
    src = root / "collages"
    src.mkdir()
    truth = {}
    for i, (name, (r, c, th, tw, g, colour, m)) in enumerate(layouts.items()):
        image, boxes, parts = make_collage(r, c, th, tw, g, colour, m, seed=i)
        save(image, src / name)
        truth[name] = ((r, c), boxes, parts)
    if noise:
        save(np.random.default_rng(7).integers(0, 256, (150, 200, 3), dtype=np.uint8), src / "noise.png")
    (src / ".hidden.png").write_bytes(b"skipped")
    (src / "notes.md").write_text("not a collage")
    return src, truth


def run(capsys, *args):
    rc = collages.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def mae(a, b):
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("compress", [False, True], ids=["png", "jpeg"])
def test_detect_grid_finds_the_gutters_exactly(name, compress):
    r, c, th, tw, g, colour, m = LAYOUTS[name]
    image, boxes, _ = make_collage(r, c, th, tw, g, colour, m, seed=3)
    rows, cols = collages.detect_grid(jpeg(image) if compress else image, min_cell=32)
    assert (len(rows), len(cols)) == (r, c)
    assert [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols] == boxes


def test_no_gutters_no_grid_and_no_guess_otherwise():
    image, boxes, _ = make_collage(2, 3, 80, 90, seed=5, tiles=smooth_tile)  # edge to edge: auto never cuts it
    for im in (image, jpeg(image)):
        assert isinstance(collages.detect_grid(im, min_cell=32), str)
    rng = np.random.default_rng(0)
    for im in (rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), tile(1, 200, 300), smooth_tile(2, 200, 300),
               make_collage(2, 2, 80, 80, seed=6)[0]):  # noise, one blocky / smooth picture, blocky edge to edge
        assert collages.detect_grid(im, 32) == "no gutters found (a collage drawn edge to edge needs --grid RxC)"
    white = make_collage(2, 2, 80, 80, 4, 255, seed=6)[0]
    assert isinstance(collages.detect_grid(white, min_cell=90), str)  # cells under --min-cell are no grid
    assert isinstance(collages.detect_grid(np.full((200, 300, 3), 255, np.uint8), 32), str)  # blank


def test_runs_widened_by_backgrounds_of_the_gutter_colour():
    """Cells whose white backgrounds touch the white gutters: equal cells, the widest common gutter."""
    image, boxes, _ = make_collage(1, 3, 80, 96, 3, 255, seed=8)
    image[:, 3 * 96 + 6 - 20:] = 255  # the last cell's right side white, up to the border
    image[:, 96 + 3: 96 + 3 + 15] = 255  # the middle cell's left side white
    rows, cols = collages.detect_grid(image, min_cell=32)
    assert rows == [(0, 80)] and cols == [(0, 96), (99, 195), (198, 294)]


def test_split_auto_cells_files_manifest_and_noise_skipped(tmp_path, capsys):
    src, truth = make_src(tmp_path)
    dst = tmp_path / "photos"
    rc, out, err = run(capsys, "--src", src, "--dst", dst, "--min-cell", 32, "--preview", tmp_path / "p.png")
    assert rc == 0, err
    assert err.strip().splitlines() == [f"warning: skipping {src / 'noise.png'}: no gutters found (a collage "
                                        "drawn edge to edge needs --grid RxC)"]
    assert "5 collages (1 skipped: no determined grid) -> 23 photos of 5 subjects" in out
    assert f"python -m jedi_jax.data.folder_sets --src {dst}" in out
    assert sorted(p.name for p in dst.iterdir()) == ["backpack", "cat", "clock", "collages.json", "dog", "vase"]
    m = json.loads((dst / "collages.json").read_text())
    assert m["tool"] == "jedi_jax.data.collages" and m["grid"] == "auto"
    assert m["skipped"] == [{"file": "noise.png", "why": "no gutters found (a collage drawn edge to edge needs --grid RxC)"}]
    assert m["command"].startswith("python -m jedi_jax.data.collages --src ")
    for entry in m["collages"]:
        (r, c), boxes, parts = truth[entry["file"]]
        assert entry["grid"] == f"{r}x{c}" and entry["method"] == "gutters"
        assert entry["subject"] == Path(entry["file"]).stem
        assert [tuple(cell["box"]) for cell in entry["cells"]] == boxes
        folder = dst / entry["subject"]
        assert sorted(p.name for p in folder.iterdir()) == [f"{j:02d}.png" for j in range(r * c)]  # no sidecars
        for j, part in enumerate(parts):
            got = np.asarray(Image.open(folder / f"{j:02d}.png"))
            assert got.shape == trimmed(part).shape
            assert mae(got, trimmed(part)) < (5 if entry["file"].endswith(".jpg") else 1e-9), (entry["file"], j)
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "RGB" and im.width > 3 * 128
    assert leftovers(tmp_path) == []
    # the folders are what folder_sets reads: class from the folder name, "a photo of a {class}"
    rc = folder_sets.main(["--src", str(dst), "--dst", str(tmp_path / "sets"), "--resolution", "16"])
    assert rc == 0, capsys.readouterr().err
    rec = ArrayRecordSetSource(str(tmp_path / "sets" / "train.array_record"))[0]
    assert rec["subject"] == "backpack" and rec["captions"] == ["a photo of a backpack"] * 4
    assert rec["images"].shape == (4, 16, 16, 3)


def test_given_grid_splits_a_collage_without_gutters(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    image, boxes, parts = make_collage(3, 2, 64, 80, seed=9)  # edge to edge, blocky: auto finds nothing
    save(image, src / "flat.png")
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "auto", "--min-cell", 32)
    warning, error = err.strip().splitlines()  # the skip, then: nothing left to write
    assert rc == 2 and warning.startswith("warning: skipping") and error.startswith("error: ")
    assert "needs --grid RxC" in warning and "no collage has a determined grid (1 skipped); pass --grid RxC" in error
    assert not (tmp_path / "auto").exists()
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--grid", "3x2", "--min-cell", 32)
    assert rc == 0, err
    entry = json.loads((tmp_path / "out" / "collages.json").read_text())["collages"][0]
    assert entry["grid"] == "3x2" and entry["method"] == "given" and [tuple(c["box"]) for c in entry["cells"]] == boxes
    for j, part in enumerate(parts):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "flat" / f"{j:02d}.png")), trimmed(part))


def test_captions_classes_shared_subjects_and_folder_sets(tmp_path, capsys):
    src, _ = make_src(tmp_path, {"c001.png": LAYOUTS["backpack.png"], "c002.jpg": LAYOUTS["cat.jpg"],
                                 "c003.png": LAYOUTS["clock.png"]}, noise=False)
    caps1 = ["a red backpack in a park", "a red backpack  on a desk", "a red backpack in snow", "a red backpack, beach"]
    caps2 = ["a red backpack on a bus", "a red backpack at night", "a red backpack in a tent"]
    lines = [{"file": "c001.png", "subject": "red_backpack", "class": "backpack", "captions": caps1,
              "prompt": "a photo collage of 4 photos of the same red backpack"},
             {"file": "c002", "subject": "red_backpack", "captions": caps2},  # by stem; the class from c001
             {"file": "c003.png", "class": "teddy bear"}]  # no captions: no sidecars
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    dst = tmp_path / "photos"
    rc, out, err = run(capsys, "--src", src, "--dst", dst, "--captions", tmp_path / "caps.jsonl", "--min-cell", 32)
    assert rc == 0, err
    pack = dst / "red_backpack"
    names = ["class.txt"] + [f"{j:02d}.{e}" for j in range(7) for e in ("png", "txt")]
    assert sorted(p.name for p in pack.iterdir()) == sorted(names)
    assert (pack / "class.txt").read_text() == "backpack\n"
    folded = [" ".join(c.split()) for c in caps1 + caps2]
    assert [(pack / f"{j:02d}.txt").read_text().strip() for j in range(7)] == folded
    assert sorted(p.name for p in (dst / "c003").iterdir()) == [f"{j:02d}.png" for j in range(6)] + ["class.txt"]
    m = json.loads((dst / "collages.json").read_text())
    assert m["subjects"] == {"red_backpack": 7, "c003": 6}
    assert [c["file"] for c in m["collages"][1]["cells"]] == [f"red_backpack/{j:02d}.png" for j in range(4, 7)]
    sets = tmp_path / "sets"
    rc = folder_sets.main(["--src", str(dst), "--dst", str(sets), "--resolution", "16", "--captions", "auto"])
    assert rc == 0, capsys.readouterr().err
    ds = ArrayRecordSetSource(str(sets / "train.array_record"))
    teddy, back = ds[0], ds[1]  # sorted by folder name: c003, red_backpack
    assert back["subject"] == "backpack" and back["captions"] == folded
    assert teddy["subject"] == "teddy bear" and teddy["captions"] == ["a photo of a teddy bear"] * 6


def _jsonl(root, *rows):
    (root / "caps.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return ["--captions", root / "caps.jsonl"]


CAP4 = ["w", "x", "y", "z"]
MISTAKES = {
    "missing src": (lambda root, src: ["--src", root / "nope"], "does not exist"),
    "no images": (lambda root, src: ["--src", root], "holds no collage images"),
    "bad grid": (lambda root, src: ["--grid", "2by2"], "--grid '2by2' must be auto or ROWSxCOLUMNS"),
    "zero grid": (lambda root, src: ["--grid", "0x2"], "must be auto or ROWSxCOLUMNS"),
    "bad json line": (lambda root, src: _jsonl(root, {"file": "a.png", "captions": CAP4}, "{oops"),
                      "line 2 is no JSON"),
    "no file key": (lambda root, src: _jsonl(root, {"subject": "x"}), 'line 1 is no JSON object with a "file"'),
    "unknown key": (lambda root, src: _jsonl(root, {"file": "a.png", "caption": CAP4}),
                    "line 1 has unknown key(s) 'caption'"),
    "missing file": (lambda root, src: _jsonl(root, {"file": "a.png"}, {"file": "gone.png"}),
                     "line 2 names 'gone.png', which is no collage"),
    "no line": (lambda root, src: _jsonl(root, {"file": "b.png", "captions": CAP4}),
                "has no line for 1 collage(s): a.png"),
    "caption count": (lambda root, src: _jsonl(root, {"file": "a.png", "captions": CAP4[:3]}, {"file": "b.png"})
                      + ["--grid", "2x2"], "a.png: --captions gives 3 caption(s) but --grid 2x2 cuts 4 cells"),
    "two classes": (lambda root, src: _jsonl(root, {"file": "a.png", "subject": "s", "class": "dog"},
                                             {"file": "b.png", "subject": "s", "class": "cat"}), "two classes"),
    "bad subject": (lambda root, src: _jsonl(root, {"file": "a.png", "subject": "../x"}, {"file": "b.png"}),
                    "is no folder name"),
    "manifest subject": (lambda root, src: _jsonl(root, {"file": "a.png", "subject": "collages.json"},
                                                  {"file": "b.png"}),
                         "not collages.json"),
    "small given cells": (lambda root, src: ["--grid", "5x5"], "under --min-cell 32"),
    "unreadable": (lambda root, src: (src / "c.png").write_bytes(b"no png") and [], "c.png is not a readable image"),
    "bad trim": (lambda root, src: ["--trim", "0.3"], "--trim must be in [0, 0.25)"),
    "dst exists": (lambda root, src: (root / "out").mkdir() or [], "already exists"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_each_mistake_is_one_error_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    make, says = MISTAKES[case]
    src = tmp_path / "src"
    src.mkdir()
    if case != "no images":
        for name in ("a.png", "b.png"):
            save(make_collage(2, 2, 64, 64, 4, 255, seed=len(name))[0], src / name)
    extra = make(tmp_path if case != "no images" else src, src)
    args = ["--src", src, "--dst", tmp_path / "out", "--min-cell", 32] + extra
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = run(capsys, *args)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_only_an_earlier_output(tmp_path, capsys):
    src, _ = make_src(tmp_path, {"a.png": LAYOUTS["backpack.png"]}, noise=False)
    dst = tmp_path / "photos"
    assert run(capsys, "--src", src, "--dst", dst, "--min-cell", 32)[0] == 0
    (dst / "a" / "stale.png").write_bytes(b"old")
    rc, _, err = run(capsys, "--src", src, "--dst", dst, "--min-cell", 32, "--grid", "1x1", "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in (dst / "a").iterdir()) == ["00.png"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "--src", src, "--dst", other, "--min-cell", 32, "--overwrite")
    assert rc == 2 and "has no collages.json" in err and (other / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_ctrl_c_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    src, _ = make_src(tmp_path, {"a.png": LAYOUTS["backpack.png"]}, noise=False)
    calls = []

    def interrupt(cell, trim):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return cell

    monkeypatch.setattr(collages, "trimmed", interrupt)
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--min-cell", 32, "--preview", tmp_path / "p.png")
    assert rc == 130 and err.startswith("error: interrupted")
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.png").exists() and leftovers(tmp_path) == []


def test_an_interrupt_while_the_preview_is_written_leaves_nothing(tmp_path, capsys, monkeypatch):
    src, _ = make_src(tmp_path, {"a.png": LAYOUTS["backpack.png"]}, noise=False)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(collages, "labeled_grid", interrupt)
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--min-cell", 32, "--preview", tmp_path / "p.png")
    assert rc == 130 and "nothing was written" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.png").exists() and leftovers(tmp_path) == []


# ------------------------------------------------- the review's failure cases: exact or skipped, never wrong

def test_edge_to_edge_photos_are_skipped_with_the_grid_hint_and_cut_by_a_given_grid(tmp_path, capsys):
    dogs, _ = photos()
    image, boxes = photo_collage(dogs, 2, 2)
    assert collages.detect_grid(image, 32) == "no gutters found (a collage drawn edge to edge needs --grid RxC)"
    src = tmp_path / "src"
    src.mkdir()
    save(image, src / "dog.png")
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "auto", "--min-cell", 32)
    assert rc == 2 and err.startswith(f"warning: skipping {src / 'dog.png'}: no gutters") and "--grid RxC" in err
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--min-cell", 32, "--grid", "2x2", "--trim", 0)
    assert rc == 0, err
    for j, tile_ in enumerate(dogs):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "dog" / f"{j:02d}.png")), tile_)


@pytest.mark.parametrize("colour", [255, 0])
def test_a_missed_axis_is_skipped_not_one_cell(colour):
    """Photos stacked edge to edge in each column, a gutter between the columns: never 1x2 (two photos a cell)."""
    dogs, _ = photos()
    image, boxes = photo_collage(dogs, 2, 2, gutters=(0, 6), colour=colour)
    assert isinstance(collages.detect_grid(image, 32), str)
    assert isinstance(collages.detect_grid(image, 32, cells=4), str)
    image, boxes = photo_collage(dogs, 2, 2, gutters=(6, 6), colour=colour)  # with both gutters: 2x2 exactly
    assert exact_or_skipped(image, boxes) == exact_or_skipped(image, boxes, cells=4) == "exact"


@pytest.mark.parametrize("dark_edge", [False, True])
def test_unequal_black_margins_never_end_up_in_a_cell(tmp_path, capsys, dark_edge):
    dogs, _ = photos()
    tiles = [t.copy() for t in dogs]
    if dark_edge:  # the last photo's right side as black as the margin beside it
        tiles[3][:, -20:] = 0
    image, boxes = photo_collage(tiles, 1, 4, gutters=(0, 5), colour=0, margins=(6, 4, 14, 9))
    src = tmp_path / "src"
    src.mkdir()
    save(image, src / "dog.png")
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--min-cell", 32, "--trim", 0)
    if rc == 2:  # skipped (then nothing else to write), never cut with a bar
        assert "warning: skipping" in err and not (tmp_path / "out").exists()
        return
    assert rc == 0 and dark_edge is False, err
    for j, tile_ in enumerate(tiles):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "dog" / f"{j:02d}.png")), tile_)


@pytest.mark.parametrize("margin", [0, 8])
@pytest.mark.parametrize("colour", [255, 236, 0])
def test_white_background_photos_are_exact_or_skipped_never_cropped(margin, colour):
    _, cartoons = photos()
    image, boxes = photo_collage(cartoons * 2, 2, 2, gutters=(6, 6), colour=colour, margins=(margin,) * 4)
    for im in (image, jpeg(image)):
        outcome = exact_or_skipped(im, boxes)
        assert outcome == "exact" if colour == 0 else outcome == "skipped"  # the cartoon's white hides white gutters
    image, boxes = photo_collage(cartoons * 2, 1, 4, gutters=(0, 6), colour=colour, margins=(margin,) * 4)
    exact_or_skipped(image, boxes)


def test_a_gutter_shaded_along_its_length_is_found_exactly():
    dogs, _ = photos()
    image, boxes = photo_collage(dogs, 2, 2, gutters=(8, 8), margins=(5,) * 4)
    outside = np.ones(image.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        outside[y0:y1, x0:x1] = False
    h, w = outside.shape
    for shade in (np.linspace(200, 255, w)[None, :].repeat(h, 0), np.linspace(200, 255, h)[:, None].repeat(w, 1)):
        image[outside] = shade.astype(np.uint8)[outside][:, None]
        assert exact_or_skipped(image, boxes) == "exact"


def test_unequal_layouts_are_skipped():
    dogs, cartoons = photos()
    big = np.asarray(Image.fromarray(dogs[0]).resize((96, 198)))  # one tall photo beside two small ones
    image = np.full((198, 96 + 6 + 96, 3), 255, np.uint8)
    image[:, :96], image[:96, 102:], image[102:, 102:] = big, dogs[1], dogs[2]
    assert isinstance(collages.detect_grid(image, 32), str)
    short = [np.asarray(Image.fromarray(d).resize((96, 60))) for d in dogs[2:]]  # rows of 96 and 60 px
    image, _ = photo_collage(dogs[:2], 1, 2, gutters=(0, 6))
    image = np.concatenate([image, np.full((6, image.shape[1], 3), 255, np.uint8),
                            photo_collage(short, 1, 2, gutters=(0, 6))[0]])
    assert isinstance(collages.detect_grid(image, 32), str)


def test_a_caption_count_that_differs_from_the_grid_skips_that_collage(tmp_path, capsys):
    dogs, _ = photos()
    src = tmp_path / "src"
    src.mkdir()
    save(photo_collage(dogs[:2], 1, 2, gutters=(0, 6))[0], src / "pair.png")  # 2 cells, 4 captions
    save(photo_collage(dogs, 2, 2, gutters=(6, 6))[0], src / "four.png")
    lines = [{"file": "pair.png", "captions": CAP4}, {"file": "four.png", "captions": CAP4}]
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--min-cell", 32, *_jsonl(tmp_path, *lines))
    assert rc == 0, err
    assert err.strip().splitlines() == [f"warning: skipping {src / 'pair.png'}: --captions gives 4 caption(s) but "
                                        "the grid found has 2 cells (1x2)"]
    m = json.loads((tmp_path / "out" / "collages.json").read_text())
    assert [c["file"] for c in m["collages"]] == ["four.png"] and m["collages"][0]["grid"] == "2x2"
    assert m["skipped"][0]["file"] == "pair.png"
    assert [(tmp_path / "out" / "four" / f"{j:02d}.txt").read_text() for j in range(4)] == [c + "\n" for c in CAP4]


def test_the_command_line_exit_status_and_stderr(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jedi_jax.data.collages", "--src", str(tmp_path / "nope"),
                        "--dst", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --src ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("colour", [255, 236, 128])
def test_wide_flat_margins_stay_outside_the_cells(colour):
    """A strip of two photos on a canvas that is mostly margin: flat lines are then the median line, its
    deviation ~0, and a limit relative to it once found no margin at all, so the cells took the margins
    in (a wrong cut, written). Now the cells are exact."""
    dog = Image.open(REPO / "tests" / "data" / "dreambench" / "dog_04.jpg").convert("RGB")
    w, h = dog.size
    tiles = [np.asarray(dog.crop(box).resize((200, 150), Image.BICUBIC)) for box in [(0, 0, w, h), (0, 0, w // 2, h // 2)]]
    image, boxes = photo_collage(tiles, 1, 2, gutters=(0, 8), colour=colour, margins=(12, 125, 12, 125))
    assert exact_or_skipped(image, boxes) == "exact"
    assert exact_or_skipped(image.transpose(1, 0, 2), [(y0, x0, y1, x1) for x0, y0, x1, y1 in boxes]) == "exact"


def test_fewer_captions_than_the_finest_grid_never_merge_two_photos():
    """A 1x4 with 2 captions: a 1x2 of two photos per cell would match the count; the finest grid
    the gutters allow is the one taken, so it is skipped, both counts named."""
    dogs, _ = photos()
    image, boxes = photo_collage(dogs, 1, 4, gutters=(0, 2))
    assert exact_or_skipped(image, boxes) == "exact"
    why = collages.detect_grid(image, 32, cells=2)
    assert isinstance(why, str) and why.startswith("--captions gives 2 caption(s) but the grid found has 4 cells")
