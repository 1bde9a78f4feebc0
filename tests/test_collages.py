"""python -m jedi_jax.data.collages: S3-style photo collages -> the photo folders folder_sets reads.

Hermetic: synthetic collages of known seeded tiles (blocky pictures; smooth ones for the edge finder)
in 2x2, 1x3 and 3x2 layouts, white and black gutters of 2-8 px, outer margins, some saved as JPEG
(quality 85), one without gutters, one noise picture. Run in-process through main(); one subprocess
checks a real command line's exit status and stderr."""
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


# name: (rows, cols, tile h, tile w, gutter, colour, margin)
LAYOUTS = {"a.png": (2, 2, 80, 72, 4, 255, 0), "b.jpg": (1, 3, 96, 80, 2, 0, 0),
           "c.png": (3, 2, 70, 90, 8, 255, 6), "d.jpg": (2, 2, 66, 66, 3, 0, 3), "e.jpg": (3, 2, 72, 64, 6, 255, 0)}


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
    method, rows, cols = collages.detect_grid(jpeg(image) if compress else image, min_cell=32)
    assert method == "gutters" and (len(rows), len(cols)) == (r, c)
    assert [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols] == boxes


def test_detect_grid_edges_without_gutters_and_no_guess_otherwise():
    image, boxes, _ = make_collage(2, 3, 80, 90, seed=5, tiles=smooth_tile)
    for im in (image, jpeg(image)):
        method, rows, cols = collages.detect_grid(im, min_cell=32)
        assert method == "edges" and [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols] == boxes
    rng = np.random.default_rng(0)
    assert collages.detect_grid(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), 32) is None  # noise
    assert collages.detect_grid(tile(1, 200, 300), 32) is None  # one blocky picture
    assert collages.detect_grid(smooth_tile(2, 200, 300), 32) is None  # one smooth picture
    blocky, _, _ = make_collage(2, 2, 80, 80, seed=6)  # no gutters, block lines everywhere: no even grid
    assert collages.detect_grid(blocky, 32) is None
    white = make_collage(2, 2, 80, 80, 4, 255, seed=6)[0]
    assert collages.detect_grid(white, min_cell=90) is None  # cells under --min-cell are no grid


def test_runs_widened_by_backgrounds_of_the_gutter_colour():
    """Cells whose white backgrounds touch the white gutters: equal cells, the widest common gutter."""
    image, boxes, _ = make_collage(1, 3, 80, 96, 3, 255, seed=8)
    image[:, 3 * 96 + 6 - 20:] = 255  # the last cell's right side white, up to the border
    image[:, 96 + 3: 96 + 3 + 15] = 255  # the middle cell's left side white
    _, rows, cols = collages.detect_grid(image, min_cell=32)
    assert rows == [(0, 80)] and cols == [(0, 96), (99, 195), (198, 294)]


def test_split_auto_cells_files_manifest_and_noise_skipped(tmp_path, capsys):
    src, truth = make_src(tmp_path)
    dst = tmp_path / "photos"
    rc, out, err = run(capsys, "--src", src, "--dst", dst, "--min-cell", 32, "--preview", tmp_path / "p.png")
    assert rc == 0, err
    assert err.strip().splitlines() == [f"warning: skipping {src / 'noise.png'}: no consistent grid found "
                                        "(pass --grid RxC if it is a collage)"]
    assert "5 collages (1 skipped: no grid) -> 23 photos of 5 subjects" in out
    assert f"python -m jedi_jax.data.folder_sets --src {dst}" in out
    assert sorted(p.name for p in dst.iterdir()) == ["a", "b", "c", "collages.json", "d", "e"]
    m = json.loads((dst / "collages.json").read_text())
    assert m["tool"] == "jedi_jax.data.collages" and m["skipped"] == ["noise.png"] and m["grid"] == "auto"
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
    assert rec["subject"] == "a" and rec["captions"] == ["a photo of a a"] * 4 and rec["images"].shape == (4, 16, 16, 3)


def test_given_grid_splits_a_collage_without_gutters(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    image, boxes, parts = make_collage(3, 2, 64, 80, seed=9)  # edge to edge, blocky: auto finds nothing
    save(image, src / "flat.png")
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "auto", "--min-cell", 32)
    warning, error = err.strip().splitlines()  # the skip, then: nothing left to write
    assert rc == 2 and warning.startswith("warning: skipping") and error.startswith("error: ")
    assert "no collage has a consistent grid (1 skipped); pass --grid RxC" in error
    assert not (tmp_path / "auto").exists()
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--grid", "3x2", "--min-cell", 32)
    assert rc == 0, err
    entry = json.loads((tmp_path / "out" / "collages.json").read_text())["collages"][0]
    assert entry["grid"] == "3x2" and entry["method"] == "given" and [tuple(c["box"]) for c in entry["cells"]] == boxes
    for j, part in enumerate(parts):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "flat" / f"{j:02d}.png")), trimmed(part))


def test_captions_classes_shared_subjects_and_folder_sets(tmp_path, capsys):
    src, _ = make_src(tmp_path, {"c001.png": LAYOUTS["a.png"], "c002.jpg": LAYOUTS["b.jpg"],
                                 "c003.png": LAYOUTS["c.png"]}, noise=False)
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
    "caption count": (lambda root, src: _jsonl(root, {"file": "a.png", "captions": CAP4[:3]}, {"file": "b.png"}),
                      "a.png: --captions gives 3 caption(s) but the collage has 4 cells (2x2, gutters)"),
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
    src, _ = make_src(tmp_path, {"a.png": LAYOUTS["a.png"]}, noise=False)
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
    src, _ = make_src(tmp_path, {"a.png": LAYOUTS["a.png"]}, noise=False)
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


def test_the_command_line_exit_status_and_stderr(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jedi_jax.data.collages", "--src", str(tmp_path / "nope"),
                        "--dst", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --src ")
    assert not (tmp_path / "out").exists()
