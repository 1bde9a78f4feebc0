"""python -m jedi_jax.data.folder_sets: photo folders (one a subject) -> the trainer's set data set.

Hermetic: small synthetic photo folders written with PIL in tmp (sizes and aspect ratios, an EXIF
rotation, a PNG with alpha, sidecar captions, captions.json/jsonl, class.txt, a DreamBench-format
classes file, masks) plus the repo's three DreamBench fixture photos. Built in-process through main()
(one subprocess checks the exit status and stderr of a real run)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jedi_jax.data import folder_sets
from jedi_jax.data.set_source import ArrayRecordSetSource
from jedi_jax.sampling.images import center_crop_resize, open_image, to_rgb

REPO = Path(__file__).resolve().parents[1]
FIXTURE_PHOTOS = REPO / "tests" / "data" / "dreambench"
R = 32

CLASSES_TXT = ("\ufeffClasses\r\n\r\nsubject_name,class\r\nbackpack_dog, backpack\r\nunused,stuffed animal\r\n\r\n"
               "Prompts\r\n\r\nObject Prompts\r\n\r\nprompt_list = [\r\n"
               "'a {0} {1} in the jungle'.format(unique_token, class_token),\r\n]\r\n")


def photo(path, size, seed, mode="RGB"):
    """A blocky random picture (survives JPEG), `size` = (w, h)."""
    w, h = size
    rng = np.random.default_rng(seed)
    a = np.kron(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))[:h, :w]
    im = Image.fromarray(a)
    if mode == "RGBA":
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, : w // 2] = 0  # the left half transparent: white after to_rgb
        im = Image.fromarray(np.dstack([a, alpha]), "RGBA")
    im.save(path)
    return path


def make_src(root: Path) -> Path:
    """Three subjects: backpack_dog (sidecars on 2 of 3, an RGBA PNG, an EXIF-rotated JPEG; its class
    from the classes file), teddy_bear3 (captions.json, class.txt), cartoon2 (the fixture photos, no
    captions: class from the folder name); plus things to skip."""
    src = root / "photos"
    s = src / "backpack_dog"
    s.mkdir(parents=True)
    photo(s / "00.jpg", (48, 32), 0)
    (s / "00.txt").write_text("  a red backpack\non the grass \n")
    photo(s / "01.png", (32, 40), 1, mode="RGBA")
    (s / "01.txt").write_text("a backpack in the snow")
    # raw 40 x 24, left half red, right half blue; orientation 6 shows it rotated 90 degrees clockwise
    raw = np.zeros((24, 40, 3), np.uint8)
    raw[:, :20] = (255, 0, 0)
    raw[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(s / "02.jpg", exif=exif, quality=95)
    (s / "notes.md").write_text("not an image")
    t = src / "teddy_bear3"
    t.mkdir()
    photo(t / "x.webp", (36, 36), 2)
    photo(t / "Y.JPG", (30, 50), 3)
    (t / "captions.json").write_text(json.dumps({"x.webp": "a bear on a shelf", "Y": "a bear in a box"}))
    (t / "class.txt").write_text("teddy bear\n")
    c = src / "cartoon2"
    c.mkdir()
    for p in sorted(FIXTURE_PHOTOS.glob("*.jpg")):
        shutil.copy(p, c / p.name)
    (src / ".cache").mkdir()
    (src / "README.md").write_text("photos")
    (root / "classes.txt").write_text(CLASSES_TXT, newline="")
    return src


def small_src(root: Path, names=("a1", "b2", "c3"), n=2, size=(16, 12)) -> Path:
    """Subjects of `n` small PNGs each, no captions."""
    src = root / "small"
    for i, name in enumerate(names):
        (src / name).mkdir(parents=True)
        for j in range(n):
            photo(src / name / f"{j}.png", size, 10 * i + j)
    return src


def run(capsys, *args):
    rc = folder_sets.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def expected(path, size=R):
    return np.asarray(center_crop_resize(to_rgb(open_image(path)), size))


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_images_captions_classes_and_manifest(tmp_path, capsys):
    src = make_src(tmp_path)
    dst = tmp_path / "sets"
    rc, out, err = run(capsys, "--src", src, "--dst", dst, "--resolution", R, "--classes", tmp_path / "classes.txt",
                       "--preview", tmp_path / "preview.png")
    assert rc == 0, err
    assert "train 3 subjects / 8 images" in out and f"array_record:{dst}/train.array_record" in out
    assert "no row for cartoon2, teddy_bear3" in err  # the classes file lacks them: said, not an error
    assert sorted(p.name for p in dst.iterdir()) == ["folder_sets.json", "train.array_record"]
    assert not (dst / "train.array_record.meta.json").exists()  # real photos: flip-safe
    src_ds = ArrayRecordSetSource(str(dst / "train.array_record"), backend="native")
    assert len(src_ds) == 3 and src_ds.flip_safe
    back, cartoon, teddy = (src_ds[i] for i in range(3))  # sorted by folder name
    # backpack_dog: sidecars (whitespace folded), then the class caption from the classes file
    assert back["subject"] == "backpack"
    assert back["captions"] == ["a red backpack on the grass", "a backpack in the snow", "a photo of a backpack"]
    files = [src / "backpack_dog" / n for n in ("00.jpg", "01.png", "02.jpg")]
    assert back["images"].dtype == np.uint8 and back["images"].shape == (3, R, R, 3) and "masks" not in back
    for got, f in zip(back["images"], files):
        np.testing.assert_array_equal(got, expected(f))
    assert (back["images"][1][:, :4] == 255).all()  # the transparent left half is white
    rot = back["images"][2].astype(int)  # EXIF applied: the raw left (red) half is now on top
    assert rot[1, R // 2, 0] > 200 > rot[1, R // 2, 2] and rot[-2, R // 2, 2] > 200 > rot[-2, R // 2, 0]
    # cartoon2: the fixture photos, classed by the folder name
    assert cartoon["subject"] == "cartoon" and cartoon["captions"] == ["a photo of a cartoon"] * 3
    for got, f in zip(cartoon["images"], sorted(FIXTURE_PHOTOS.glob("*.jpg"))):
        np.testing.assert_array_equal(got, expected(f))
    # teddy_bear3: captions.json by file name and by stem, class.txt, upper-case ending
    assert teddy["subject"] == "teddy bear" and teddy["captions"] == ["a bear in a box", "a bear on a shelf"]
    np.testing.assert_array_equal(teddy["images"][0], expected(src / "teddy_bear3" / "Y.JPG"))
    m = json.loads((dst / "folder_sets.json").read_text())
    assert m["source"] == str(src) and m["resolution"] == R and m["captions"] == "auto" and m["masks"] is False
    assert m["splits"]["train"]["subjects"] == [{"name": "backpack_dog", "subject": "backpack", "images": 3},
                                                {"name": "cartoon2", "subject": "cartoon", "images": 3},
                                                {"name": "teddy_bear3", "subject": "teddy bear", "images": 2}]
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["num_images"] == 8
    assert m["command"].startswith("python -m jedi_jax.data.folder_sets --src ")
    with Image.open(tmp_path / "preview.png") as im:
        assert im.mode == "RGB" and im.width > 3 * 128 and im.height > 3 * 128
    assert leftovers(tmp_path) == []
    # --captions class ignores every caption file
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "cls", "--resolution", 16, "--captions", "class")
    assert rc == 0, err
    rec = ArrayRecordSetSource(str(tmp_path / "cls" / "train.array_record"))[0]
    assert rec["subject"] == "backpack dog" and rec["captions"] == ["a photo of a backpack dog"] * 3  # no --classes


def test_masks_are_stored_aligned_and_all_or_none(tmp_path, capsys):
    src = tmp_path / "m"
    for s, (w, h) in (("cup", (40, 24)), ("hat", (24, 32))):
        (src / s).mkdir(parents=True)
        for j in range(2):
            yy, xx = np.mgrid[:h, :w]
            subject = (abs(xx - w / 2 - 3 * j) < w / 4) & (abs(yy - h / 2) < h / 3)
            img = np.where(subject[..., None], np.uint8([255, 0, 0]), np.uint8([0, 255, 0]))
            Image.fromarray(img.astype(np.uint8)).save(src / s / f"{j}.png")
            Image.fromarray(subject.astype(np.uint8) * 255).save(src / s / f"{j}.mask.png")
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--resolution", 16)
    assert rc == 0, err
    ds = ArrayRecordSetSource(str(tmp_path / "out" / "train.array_record"))
    for i in range(2):
        rec = ds[i]
        assert rec["masks"].dtype == bool and rec["masks"].shape == (2, 16, 16)
        red = rec["images"][..., 0] > 127
        assert (red == rec["masks"]).mean() > 0.95 and rec["masks"].any() and not rec["masks"].all()
    assert json.loads((tmp_path / "out" / "folder_sets.json").read_text())["masks"] is True
    (src / "hat" / "1.mask.png").unlink()
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "out2", "--resolution", 16)
    assert rc == 2 and err.count("\n") == 1 and "1.png has none" in err and "mask" in err
    assert not (tmp_path / "out2").exists() and leftovers(tmp_path) == []


def test_test_split_is_whole_subjects_disjoint_and_seeded(tmp_path, capsys):
    names = tuple(f"s{i}" for i in range(7))
    src = small_src(tmp_path, names, n=2, size=(8, 8))
    splits = {}
    for seed in range(4):
        dst = tmp_path / f"out{seed}"
        rc, out, err = run(capsys, "--src", src, "--dst", dst, "--resolution", 8, "--test-subjects", 2, "--seed", seed)
        assert rc == 0, err
        m = json.loads((dst / "folder_sets.json").read_text())
        train = [s["name"] for s in m["splits"]["train"]["subjects"]]
        test = [s["name"] for s in m["splits"]["test"]["subjects"]]
        assert len(test) == 2 and not set(train) & set(test) and sorted(train + test) == list(names)
        assert len(ArrayRecordSetSource(str(dst / "test.array_record"))) == 2
        assert len(ArrayRecordSetSource(str(dst / "train.array_record"))) == 5
        splits[seed] = test
    assert len({tuple(t) for t in splits.values()}) > 1  # the seed picks them
    again = tmp_path / "again"
    rc, _, err = run(capsys, "--src", src, "--dst", again, "--resolution", 8, "--test-subjects", 2, "--seed", 0)
    m = json.loads((again / "folder_sets.json").read_text())
    assert rc == 0 and [s["name"] for s in m["splits"]["test"]["subjects"]] == splits[0]
    assert folder_sets.split_subjects(list(names), test_fraction=0.3, seed=1)[1].__len__() == 2
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "none", "--resolution", 8, "--test-fraction", 0.99)
    assert rc == 2 and "leaves no train subject" in err and not (tmp_path / "none").exists()


def _no_folders(src):
    for d in list(src.iterdir()):
        shutil.rmtree(d)
    photo(src / "x.png", (8, 8), 0)


def _unreadable(src):
    (src / "b2" / "bad.jpg").write_bytes(b"not a jpeg")


def _empty_caption(src):
    (src / "c3" / "1.txt").write_text(" \n")


def _one_image(src):
    (src / "b2" / "1.png").unlink()


def _orphan_mask(src):
    photo(src / "a1" / "3.mask.png", (16, 12), 0)


def _mask_frame(src):
    for d in ("a1", "b2", "c3"):
        for j in range(2):
            photo(src / d / f"{j}.mask.png", (16, 12) if (d, j) != ("c3", 1) else (12, 16), j)


def _orphan_json(src):
    (src / "a1" / "captions.json").write_text(json.dumps({"9.png": "a thing"}))


ERRORS = {  # name: (change to the source, extra args, what the one error line says)
    "missing src": (lambda s: shutil.rmtree(s), (), "does not exist"),
    "no subject folders": (_no_folders, (), "has no subject folders"),
    "too few images": (_one_image, (), "'b2' (1)"),
    "unreadable image": (_unreadable, (), "bad.jpg is not a readable image"),
    "empty caption": (_empty_caption, (), "1.txt is empty"),
    "captions files": (lambda s: None, ("--captions", "files"), "a1/0.png has no caption"),
    "caption of no image": (_orphan_json, (), "'9.png', which is no image of 'a1'"),
    "mask of no image": (_orphan_mask, (), "3.mask.png belongs to no image"),
    "mask of another frame": (_mask_frame, (), "c3/1.mask.png is 12x16 but its image is 16x12"),
    "two caption tables": (lambda s: [(s / "a1" / n).write_text("{}") for n in ("captions.json", "captions.jsonl")],
                           (), "has both captions.json and captions.jsonl"),
    "preview folder": (lambda s: None, ("--preview", "/nonexistent/p.png"), "a .png file in an existing folder"),
    "test leaves no train": (lambda s: None, ("--test-subjects", 3), "leaves no train subject"),
    "resolution": (lambda s: None, ("--resolution", 30), "--resolution 30 must be a positive multiple of 8"),
    "resolution 0": (lambda s: None, ("--resolution", 0), "positive multiple of 8"),
    "caption file of no image": (lambda s: (s / "a1" / "7.txt").write_text("a typo's caption"), (),
                                 "7.txt belongs to no image"),
    "test fraction": (lambda s: None, ("--test-fraction", 1.5), "--test-fraction must be in [0, 1), got 1.5"),
    "min images": (lambda s: None, ("--min-images", 0), "--min-images must be >= 1, got 0"),
}


def test_sidecar_captions_match_their_image_whatever_the_case(tmp_path, capsys):
    """Cameras write IMG_1.JPG; its caption IMG_1.TXT (or .txt) belongs to it, as its mask would."""
    from jedi_jax.data.set_source import ArrayRecordSetSource

    src = tmp_path / "src"
    (src / "mug").mkdir(parents=True)
    for j, (image, caption) in enumerate((("IMG_1.JPG", "IMG_1.TXT"), ("img_2.png", "IMG_2.txt"))):
        photo(src / "mug" / image, (16, 12), j)
        (src / "mug" / caption).write_text(f"the mug, photo {j}")
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--resolution", 8)
    assert rc == 0, err
    record = ArrayRecordSetSource(str(tmp_path / "out" / "train.array_record"))[0]
    assert list(record["captions"]) == ["the mug, photo 0", "the mug, photo 1"]


@pytest.mark.parametrize("case", ERRORS)
def test_each_mistake_is_one_error_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    change, extra, says = ERRORS[case]
    src = small_src(tmp_path)
    change(src)
    dst = tmp_path / "out"
    args = ["--src", src, "--dst", dst, "--resolution", 8, *extra]
    rc, out, err = run(capsys, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not dst.exists() and leftovers(tmp_path) == []


def test_captions_jsonl_and_sidecars_first(tmp_path, capsys):
    src = small_src(tmp_path, ("a1", "b2"))
    (src / "a1" / "captions.jsonl").write_text('{"file_name": "0.png", "text": "zero"}\n\n{"1": " one  more "}\n')
    (src / "b2" / "captions.json").write_text(json.dumps({"0.png": "from json", "1.png": "from json too"}))
    (src / "b2" / "0.txt").write_text("from the sidecar")
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "o", "--resolution", 8, "--captions", "files")
    assert rc == 0, err
    ds = ArrayRecordSetSource(str(tmp_path / "o" / "train.array_record"))
    assert ds[0]["captions"] == ["zero", "one more"] and ds[1]["captions"] == ["from the sidecar", "from json too"]


def test_small_subjects_skipped_with_a_warning_when_asked(tmp_path, capsys):
    src = small_src(tmp_path)
    _one_image(src)
    rc, out, err = run(capsys, "--src", src, "--dst", tmp_path / "o", "--resolution", 8, "--skip-small")
    assert rc == 0 and "warning: skipping subject 'b2': 1 image(s)" in err
    m = json.loads((tmp_path / "o" / "folder_sets.json").read_text())
    assert m["skipped"] == [{"name": "b2", "images": 1}] and m["splits"]["train"]["num_subjects"] == 2


def test_overwrite_replaces_only_a_complete_new_output(tmp_path, capsys):
    src = small_src(tmp_path)
    dst = tmp_path / "out"
    assert run(capsys, "--src", src, "--dst", dst, "--resolution", 8)[0] == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    rc, _, err = run(capsys, "--src", src, "--dst", dst, "--resolution", 16)
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    _unreadable(src)  # the new build fails half-way: the old output stays whole
    rc, _, err = run(capsys, "--src", src, "--dst", dst, "--resolution", 16, "--overwrite")
    assert rc == 2 and "bad.jpg" in err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before and leftovers(tmp_path) == []
    (src / "b2" / "bad.jpg").unlink()
    assert run(capsys, "--src", src, "--dst", dst, "--resolution", 16, "--overwrite")[0] == 0
    assert ArrayRecordSetSource(str(dst / "train.array_record"))[0]["images"].shape == (2, 16, 16, 3)
    assert leftovers(tmp_path) == []
    other = tmp_path / "other"  # a folder that is no output of this tool is never replaced
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "--src", src, "--dst", other, "--resolution", 8, "--overwrite")
    assert rc == 2 and "folder_sets.json" in err and (other / "keep.txt").read_text() == "mine"
    rc, _, err = run(capsys, "--src", src, "--dst", src / "sets", "--resolution", 8)
    assert rc == 2 and "must not hold one another" in err


def test_ctrl_c_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    src = small_src(tmp_path)
    real, calls = folder_sets.load_subject, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(folder_sets, "load_subject", interrupted)
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "out", "--resolution", 8,
                     "--preview", tmp_path / "p.png")
    assert rc == 130 and "interrupted" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.png").exists() and leftovers(tmp_path) == []


def test_classes_table_and_folder_names():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.txt"
        path.write_text(CLASSES_TXT, newline="")
        assert folder_sets.read_classes(path) == {"backpack_dog": "backpack", "unused": "stuffed animal"}
        path.write_text("dog2,dog\ncat,cat\n")  # a bare CSV
        assert folder_sets.read_classes(path) == {"dog2": "dog", "cat": "cat"}
        path.write_text("Classes\n\nnothing here\n")
        with pytest.raises(folder_sets.UserError, match="no `subject_name,class` table"):
            folder_sets.read_classes(path)
    assert [folder_sets.folder_class(n) for n in ("dog2", "red_cartoon", "dog_2", "teddy-bear", "0001")] == \
        ["dog", "red cartoon", "dog", "teddy bear", "0001"]


def test_the_command_line_exit_status_and_stderr(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jedi_jax.data.folder_sets", "--src", str(tmp_path / "nope"),
                        "--dst", str(tmp_path / "out"), "--resolution", "64"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: --src {tmp_path / 'nope'} does not exist"]


@pytest.mark.parametrize("set_size", [2, 5])
def test_the_written_train_file_drives_the_training_loader(tmp_path, capsys, set_size):
    """configs/sd15.py:tiny's data section with data.source=array_record:OUT/train.array_record: a
    subject of n photos fills min(n, N) members; the rest of the set is padding (member_mask False)."""
    from configs import sd15
    from jedi_jax.train import data as data_lib

    src = small_src(tmp_path, ("a1", "b2", "c3"), n=3, size=(20, 12))
    (src / "b2" / "2.png").unlink()  # sets of 3, 2, 3 photos
    dst = tmp_path / "out"
    assert run(capsys, "--src", src, "--dst", dst, "--resolution", 16)[0] == 0
    cfg = sd15.get_config("tiny").data
    cfg.source = f"array_record:{dst}/train.array_record"
    cfg.set_size, cfg.batch_size, cfg.hflip, cfg.caption_dropout = set_size, 3, 0.5, 0.0
    assert not data_lib.renders_mini_world(cfg)  # real photos: mirroring allowed
    loader = data_lib.make_loader(cfg, tokenize_fn=None, seed=0, process_index=0, process_count=1)
    with loader:
        batch = next(loader)
    S = cfg.image_size
    assert batch["images"].shape == (3, set_size, S, S, 3)
    sizes = {0: 3, 1: 2, 2: 3}
    for b in range(3):
        n = sizes[int(batch["set_index"][b])]
        assert batch["member_mask"][b].sum() == min(n, set_size)
        assert (batch["images"][b][~batch["member_mask"][b]] == 0).all()
        cls = "abc"[int(batch["set_index"][b])]  # folders a1, b2, c3: classes a, b, c
        assert set(batch["captions"][b][batch["member_mask"][b]]) == {f"a photo of a {cls}"}


def test_dino_consistency_is_recorded_and_inconsistent_subjects_are_filtered(tmp_path, capsys, dino_folder):
    """S³'s filter with a (tiny, random) DINO: a subject whose photos are one picture three times has
    consistency 1 whatever the weights, one of three different pictures less; --min-consistency
    between the two keeps the first only. The recorded values are the scorer's own pairwise cosines."""
    from jedi_jax.data.set_source import ArrayRecordSetSource
    from jedi_jax.eval.image_text_embedders import DinoScorer, embed_each, mean_pairwise_cosine

    src = small_src(tmp_path, names=("mixed", "same"), n=3, size=(40, 40))
    for j in (1, 2):
        shutil.copy(src / "same" / "0.png", src / "same" / f"{j}.png")
    folder = str(dino_folder[0])
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "all", "--resolution", 8, "--dino", folder)
    assert rc == 0, err
    scores = json.loads((tmp_path / "all" / "folder_sets.json").read_text())["consistency"]["per_subject"]
    assert scores["same"] == pytest.approx(1.0, abs=1e-6) and scores["mixed"] < 1 - 1e-5  # random tiny weights:
    threshold = (1 + scores["mixed"]) / 2  # different pictures come out close, not equal
    scorer = DinoScorer.from_folder(folder)
    mixed = embed_each(scorer, [np.asarray(to_rgb(open_image(p))) for p in sorted((src / "mixed").iterdir())])
    assert scores["mixed"] == pytest.approx(mean_pairwise_cosine(mixed), abs=1e-6)

    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "kept", "--resolution", 8, "--dino", folder,
                     "--min-consistency", threshold)
    assert rc == 0 and "leaving out subject 'mixed': DINO consistency" in err
    manifest = json.loads((tmp_path / "kept" / "folder_sets.json").read_text())
    assert [f["name"] for f in manifest["consistency"]["filtered"]] == ["mixed"]
    assert len(ArrayRecordSetSource(str(tmp_path / "kept" / "train.array_record"))) == 1

    # a subject of one photo has no pair to measure: recorded as None, left out under --min-consistency
    (src / "lonely").mkdir()
    photo(src / "lonely" / "0.png", (40, 40), 99)
    rc, _, err = run(capsys, "--src", src, "--dst", tmp_path / "one", "--resolution", 8, "--dino", folder,
                     "--min-images", 1, "--min-consistency", threshold)
    assert rc == 0 and "leaving out subject 'lonely': DINO consistency none (one photo)" in err
    manifest = json.loads((tmp_path / "one" / "folder_sets.json").read_text())["consistency"]
    assert manifest["per_subject"]["lonely"] is None
    assert sorted(f["name"] for f in manifest["filtered"]) == ["lonely", "mixed"]
    # a threshold no subject meets is an error naming the best score at full precision
    two = small_src(tmp_path / "two", names=("a", "b"), n=2, size=(40, 40))  # different pictures: below 1
    rc, _, err = run(capsys, "--src", two, "--dst", tmp_path / "none", "--resolution", 8, "--dino", folder,
                     "--min-consistency", 1.0)
    assert rc == 2 and re.search(r"--min-consistency 1.0 leaves no subject \(highest 0\.\d{4,}\)$", err.strip()), err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("args, says", [
    (("--min-consistency", 0.5), "--min-consistency 0.5 needs --dino DIR"),
    (("--dino", "NOWHERE"), "--dino NOWHERE: no config.json there"),
])
def test_consistency_mistakes_are_one_line(tmp_path, capsys, args, says):
    rc, out, err = run(capsys, "--src", small_src(tmp_path), "--dst", tmp_path / "out", "--resolution", 8, *args)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()
