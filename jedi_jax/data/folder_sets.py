r"""Builds a same-subject SET data set (what the trainer reads as ``array_record:PATH``) from folders
of photos: one folder a subject, as DreamBench (or an S3-like collection) lays them out.

    python -m jedi_jax.data.folder_sets --src PHOTOS_DIR --dst OUT_DIR --resolution 512 \
        [--captions auto|files|class] [--classes FILE] [--test-subjects N | --test-fraction F] \
        [--seed S] [--min-images 2] [--skip-small] [--overwrite] [--preview PNG]

Layout read:

    PHOTOS_DIR/<subject>/<image>.{jpg,jpeg,png,webp}   one folder a subject (any case of the ending)
    PHOTOS_DIR/<subject>/<image>.txt                   optional caption of <image> (the finetuning
                                                       sidecar convention)
    PHOTOS_DIR/<subject>/captions.json                 optional {"<image file>": "caption", ...}
    PHOTOS_DIR/<subject>/captions.jsonl                optional, a line each: {"file_name": ..., "text": ...}
                                                       ("caption" for "text" and a one-key
                                                       {"<image file>": "caption"} line work too)
    PHOTOS_DIR/<subject>/class.txt                     optional class phrase of the subject ("dog")
    PHOTOS_DIR/<subject>/<image>.mask.png              optional subject mask (white = subject)

Files and folders whose names start with "." are skipped, as are loose files in PHOTOS_DIR (a README,
DreamBench's prompts_and_classes.txt) and anything else in a subject folder that is no image.

Captions (--captions): "auto" (default) takes an image's <image>.txt, else its captions.json(l)
entry, else "a photo of a {class}"; "files" requires a caption file for every image; "class" gives
every image "a photo of a {class}". The class of a subject: its row in --classes FILE (a
"subject_name,class" table such as DreamBench's prompts_and_classes.txt; only the table after the
"Classes" header is read), else its class.txt, else its folder name with underscores as spaces and
trailing digits dropped (dog2 -> dog). Whitespace in captions is folded to single spaces. The
record's `subject` text is the class phrase.

Every image is EXIF-oriented, made RGB (transparency on white), centre-cropped to a square and
resized to --resolution (jedi_jax.sampling.images); a mask gets the same crop and resize, then
> 127 = subject. Either every image has a mask or none does (records store masks per set).

Output (written beside OUT_DIR under a hidden temporary name, renamed into place when complete):

    OUT_DIR/train.array_record     one set record a subject: images uint8 (n, R, R, 3), captions,
    OUT_DIR/test.array_record      masks bool (n, R, R) when given, subject; only with a test split
    OUT_DIR/folder_sets.json       manifest: source, resolution, caption mode, per split the subjects
                                   and image counts, the command

The test split (--test-subjects N or --test-fraction F) takes whole subjects, chosen from --seed.
Train on the result (the loader draws min(n, N) of a subject's n photos each time it visits the
set, N = data.set_size; smaller sets are padded and their member_mask says so):

    python -m jedi_jax.train --config configs/sd15.py --workdir runs/mine \
        --config.data.source=array_record:OUT_DIR/train.array_record --config.data.hflip=0.5

S³'s filter of inconsistent sets (Zeng et al., CVPR 2024, Sec. 3): --dino DIR (a Hugging Face DINO
ViT folder, facebook/dino-vits16) records each subject's consistency, the mean DINO cosine over pairs of
its photos, in the manifest; --min-consistency C also leaves out (with a warning) the subjects below C,
and those of one photo (no pair to measure; such subjects exist only under --min-images 1).

Mistakes (missing --src, no subject folders, a subject with fewer than --min-images photos, an
unreadable image, an empty caption, masks on some images only, a test split that leaves no train
subject, a resolution that is no positive multiple of 8) end with one `error:` line and exit status
2, and nothing is written. A subject with too few photos is an error unless --skip-small is given
(then it is left out with a warning and listed in the manifest). --overwrite replaces an earlier
output (a folder with folder_sets.json) only once the new one is complete.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from jedi_jax.data.set_source import write_array_record
from jedi_jax.sampling.images import ImageInputError, center_crop_resize, labeled_grid, open_image, to_rgb

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = ".mask.png"
MANIFEST = "folder_sets.json"
CAPTION_MODES = ("auto", "files", "class")
PREVIEW_SETS, PREVIEW_IMAGES = 6, 6


class UserError(ValueError):
    """A mistake in the command or the photo folders: reported as one `error:` line, exit status 2."""


@dataclasses.dataclass
class Subject:
    name: str  # the folder name
    cls: str  # the class phrase: the record's subject text
    images: list[Path]
    captions: list[str]
    masks: list[Path | None]


def fold_whitespace(text: str) -> str:
    return " ".join(text.split())


def read_classes(path: str | os.PathLike) -> dict[str, str]:
    """{subject_name: class} from a DreamBench-style prompts_and_classes.txt or a bare two-column CSV
    (parse_classes)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--classes {path}: cannot read it ({type(e).__name__})") from e
    return parse_classes(text, f"--classes {path}")


def parse_classes(text: str, what: str) -> dict[str, str]:
    """{subject_name: class}: the table after a "Classes" line (DreamBench's prompts_and_classes.txt),
    under an optional "subject_name,class" header, up to the first line that is no `name,class` row;
    without a "Classes" line, the whole text as a two-column CSV. `what` names the source in errors."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.strip().lower() == "classes"]
    table: dict[str, str] = {}
    for line in lines[heads[0] + 1 if heads else 0:]:
        parts = [p.strip() for p in line.split(",")]
        # a prompt line ('a {0} {1}'.format(u, c)) is not a row, though it has one comma
        if len(parts) != 2 or not all(parts) or re.search(r"""['"{}()]""", line):
            if table:
                break  # the table is over (DreamBench's "Prompts" section follows)
            continue
        name, cls = parts
        if name.lower() in ("subject_name", "subject", "name") and cls.lower() == "class":
            continue
        if table.get(name, cls) != cls:
            raise UserError(f"{what}: subject {name!r} has two classes, {table[name]!r} and {cls!r}")
        table[name] = fold_whitespace(cls)
    if not table:
        raise UserError(f"{what}: no `subject_name,class` table in it")
    return table


def folder_class(name: str) -> str:
    """The class phrase a folder name gives: underscores and hyphens as spaces, trailing digits dropped
    (dog2 -> dog, red_cartoon -> red cartoon); the name itself if nothing is left ("0001")."""
    return fold_whitespace(re.sub(r"\d+$", "", name).replace("_", " ").replace("-", " ")) or name


def _read_caption_file(path: Path, what: str = "caption file") -> str:
    try:
        text = fold_whitespace(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__})") from e
    if not text:
        raise UserError(f"{what} {path} is empty")
    return text


def _caption_table(folder: Path, images: dict[str, Path]) -> dict[str, str]:
    """{image file name: caption} of a subject's captions.json / captions.jsonl (keys: file names
    or stems); an entry naming no image of the subject, or an empty caption, is an error."""
    files = [folder / n for n in ("captions.json", "captions.jsonl") if (folder / n).is_file()]
    if len(files) > 1:
        raise UserError(f"{folder} has both captions.json and captions.jsonl: keep one")
    if not files:
        return {}
    path, pairs = files[0], []
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a {file name: caption} object")
            pairs = list(data.items())
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                name = next((row[k] for k in ("file_name", "file", "image") if k in row), None) \
                    if isinstance(row, dict) else None
                caption = next((row[k] for k in ("text", "caption") if k in row), None) if name is not None else None
                if name is None and isinstance(row, dict) and len(row) == 1:
                    name, caption = next(iter(row.items()))
                if name is None or caption is None:
                    raise ValueError(f"line {lineno} has no file_name and text")
                pairs.append((name, caption))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from e
    by_stem = {Path(n).stem: n for n in images}
    table = {}
    for key, caption in pairs:
        name = key if key in images else by_stem.get(str(key))
        if name is None:
            raise UserError(f"{path} has a caption for {key!r}, which is no image of {folder.name!r}")
        if not isinstance(caption, str) or not fold_whitespace(caption):
            raise UserError(f"{path}: the caption of {key!r} is empty")
        table[name] = fold_whitespace(caption)
    return table


def scan_subject(folder: Path, captions: str, classes: dict[str, str]) -> Subject:
    """A subject folder's images (sorted by name), captions, masks and class; no image is decoded."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    lower = {p.name.lower(): p for p in files}
    images = {p.name: p for p in files
              if p.suffix.lower() in IMAGE_EXTS and not p.name.lower().endswith(MASK_SUFFIX)}
    stems: dict[str, Path] = {}
    for p in images.values():
        if p.stem in stems:
            raise UserError(f"{stems[p.stem]} and {p.name} share the name {p.stem!r}: their caption and mask "
                            "files could not tell them apart; rename one")
        stems[p.stem] = p
    lower_stems = {stem.lower() for stem in stems}
    for p in files:
        if p.name.lower().endswith(MASK_SUFFIX) and p.name[: -len(MASK_SUFFIX)].lower() not in lower_stems:
            raise UserError(f"mask {p} belongs to no image (expected {p.name[: -len(MASK_SUFFIX)]}.jpg/.png/...)")
        # a caption file that names no image would be dropped without a word (a typo, an image deleted)
        if p.suffix.lower() == ".txt" and p.name.lower() != "class.txt" and p.stem.lower() not in lower_stems:
            raise UserError(f"caption file {p} belongs to no image (expected {p.stem}.jpg/.png/...)")
    cls = classes.get(folder.name)
    if cls is None and (folder / "class.txt").is_file():
        cls = _read_caption_file(folder / "class.txt", "class file")
    cls = cls or folder_class(folder.name)
    table = _caption_table(folder, images) if captions != "class" else {}
    out = Subject(folder.name, cls, [], [], [])
    for name, path in sorted(images.items()):
        sidecar = lower.get(path.stem.lower() + ".txt")  # IMG_1.JPG's caption may be IMG_1.TXT
        caption = None
        if captions != "class":
            caption = _read_caption_file(sidecar) if sidecar is not None else table.get(name)
        if caption is None and captions == "files":
            raise UserError(f"--captions files: {path} has no caption (no {path.stem}.txt, no captions.json(l) entry)")
        out.images.append(path)
        out.captions.append(caption or f"a photo of a {cls}")
        out.masks.append(lower.get((path.stem + MASK_SUFFIX).lower()))
    return out


def scan(src: Path, captions: str = "auto", classes: dict[str, str] | None = None, min_images: int = 2,
         skip_small: bool = False) -> tuple[list[Subject], list[dict]]:
    """(subjects with at least min_images images, sorted by name; skipped [{name, images}])."""
    if not src.exists():
        raise UserError(f"--src {src} does not exist")
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = any(p.suffix.lower() in IMAGE_EXTS for p in src.iterdir())
        raise UserError(f"--src {src} has no subject folders (expected {src}/<subject>/<image>.jpg)"
                        + ("; it holds images itself: put them in a subject folder" if loose else ""))
    classes = classes or {}
    subjects = [scan_subject(f, captions, classes) for f in folders]
    small = [s for s in subjects if len(s.images) < min_images]
    if small and not skip_small:
        names = ", ".join(f"{s.name!r} ({len(s.images)})" for s in small[:5]) + (" ..." if len(small) > 5 else "")
        raise UserError(f"{len(small)} subject folder(s) have fewer than --min-images {min_images} images: {names}; "
                        "add photos, remove the folders, or pass --skip-small to leave them out")
    for s in small:
        print(f"warning: skipping subject {s.name!r}: {len(s.images)} image(s) < --min-images {min_images}",
              file=sys.stderr)
    subjects = [s for s in subjects if len(s.images) >= min_images]
    if not subjects:
        raise UserError(f"--src {src}: no subject folder has --min-images {min_images} images")
    if missing := [s.name for s in subjects if classes and s.name not in classes]:
        print(f"warning: --classes has no row for {', '.join(missing)}: class from class.txt or the folder name",
              file=sys.stderr)
    masked = sum(m is not None for s in subjects for m in s.masks)
    if 0 < masked < sum(len(s.images) for s in subjects):
        first = next(p for s in subjects for p, m in zip(s.images, s.masks) if m is None)
        raise UserError(f"{masked} images have a mask (<image>{MASK_SUFFIX}) but {first} has none: give every "
                        "image a mask or none (the records store masks per set)")
    return subjects, [{"name": s.name, "images": len(s.images)} for s in small]


def split_subjects(names: Sequence[str], test_subjects: int = 0, test_fraction: float = 0.0,
                   seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test) names, disjoint, in the given order; the test subjects are drawn from `seed`."""
    k = test_subjects or (max(1, round(test_fraction * len(names))) if test_fraction > 0 else 0)
    if k >= len(names):
        raise UserError(f"a test split of {k} subject(s) leaves no train subject ({len(names)} in all)")
    test = set(random.Random(seed).sample(sorted(names), k))
    return [n for n in names if n not in test], [n for n in names if n in test]


def open_photo(path: Path) -> Image.Image:
    try:
        return open_image(path)
    except ImageInputError as e:
        cause = f" ({type(e.__cause__).__name__})" if e.__cause__ is not None else ""
        raise UserError(f"{path} is not a readable image{cause}") from e


def filter_inconsistent(subjects: list[Subject], dino: str, min_consistency: float | None,
                        progress: bool = True) -> tuple[list[Subject], dict]:
    """S³'s last step (Zeng et al., CVPR 2024, Sec. 3): sets whose images do not show one subject
    are filtered out. A subject's consistency is the mean DINO cosine over pairs of its photos (each
    photo as it is, DreamBench's DINO); below `min_consistency` (None: keep all, record only) it is
    left out with a warning, and so is a subject of one photo (no pair to measure: None). Returns
    (kept subjects, the manifest's "consistency" entry)."""
    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.eval.image_text_embedders import DinoScorer, embed_each, mean_pairwise_cosine

    try:
        scorer = DinoScorer.from_folder(dino)
    except ConversionError as e:
        raise UserError(f"--dino {dino}: {e}") from None
    scores: dict[str, float | None] = {}  # None: a subject of one photo, nothing to compare
    for s in tqdm(subjects, desc="folder_sets: DINO consistency", unit="subject", disable=None if progress else True):
        scores[s.name] = mean_pairwise_cosine(embed_each(scorer, [np.asarray(to_rgb(open_photo(p))) for p in s.images]))
    shown = lambda v: "none (one photo)" if v is None else repr(v)  # noqa: E731  (0.9999996 is not 1)
    dropped = [s for s in subjects if min_consistency is not None
               and (scores[s.name] is None or scores[s.name] < min_consistency)]
    for s in dropped:
        print(f"warning: leaving out subject {s.name!r}: DINO consistency {shown(scores[s.name])} < "
              f"--min-consistency {min_consistency}", file=sys.stderr)
    kept = [s for s in subjects if s not in dropped]
    if not kept:
        best = max((v for v in scores.values() if v is not None), default=None)
        raise UserError(f"--min-consistency {min_consistency} leaves no subject (highest {shown(best)})")
    entry = {"dino": str(Path(dino).resolve()), "min": min_consistency,
             "per_subject": scores,
             "filtered": [{"name": s.name, "consistency": scores[s.name]} for s in dropped]}
    return kept, entry


def load_subject(subject: Subject, resolution: int, progress=None) -> dict[str, Any]:
    """A subject -> set record, every image (and mask) centre-cropped and resized to `resolution`."""
    images, masks = [], []
    for path, mask in zip(subject.images, subject.masks):
        opened = open_photo(path)
        images.append(np.asarray(center_crop_resize(to_rgb(opened), resolution), np.uint8))
        if mask is not None:
            m = open_photo(mask)
            (w, h), (mw, mh) = opened.size, m.size
            if abs(mw * h - w * mh) > 0.01 * w * mh:  # each is centre-cropped on its own: frames must agree
                raise UserError(f"mask {mask} is {mw}x{mh} but its image is {w}x{h} (after EXIF orientation)")
            masks.append(np.asarray(center_crop_resize(to_rgb(m), resolution).convert("L")) > 127)
        if progress is not None:
            progress.update(1)
    record = {"images": np.stack(images), "captions": list(subject.captions), "subject": subject.cls}
    if masks:
        record["masks"] = np.stack(masks)
    return record


def _preview(rows: list[tuple[str, dict]], path: str, resolution: int) -> None:
    cell = 128  # labels wrap at cell // 6 characters: small resolutions are shown enlarged
    small = lambda a: np.asarray(Image.fromarray(a).resize((cell, cell), Image.BICUBIC))  # noqa: E731
    grid = labeled_grid([[small(a) for a in rec["images"][:PREVIEW_IMAGES]] for _, rec in rows],
                        [[f"[{name}] {c}" if j == 0 else c for j, c in enumerate(rec["captions"][:PREVIEW_IMAGES])]
                         for name, rec in rows], cell=cell)
    grid.save(path, format="PNG")


def build(src: str | os.PathLike, dst: str | os.PathLike, resolution: int, *, captions: str = "auto",
          classes_file: str | None = None, test_subjects: int = 0, test_fraction: float = 0.0, seed: int = 0,
          min_images: int = 2, skip_small: bool = False, overwrite: bool = False, preview: str | None = None,
          dino: str | None = None, min_consistency: float | None = None, command: str = "",
          progress: bool = True) -> dict:
    """Builds OUT_DIR (see the module docstring) atomically; returns the manifest. UserError on mistakes."""
    if resolution <= 0 or resolution % 8:
        raise UserError(f"--resolution {resolution} must be a positive multiple of 8")
    if captions not in CAPTION_MODES:
        raise UserError(f"--captions {captions!r} must be one of {', '.join(CAPTION_MODES)}")
    for flag, value, ok, rule in (("--min-images", min_images, min_images >= 1, ">= 1"),
                                  ("--test-subjects", test_subjects, test_subjects >= 0, ">= 0"),
                                  ("--test-fraction", test_fraction, 0 <= test_fraction < 1, "in [0, 1)")):
        if not ok:  # `not (0 <= x < 1)` also catches a NaN fraction
            raise UserError(f"{flag} must be {rule}, got {value}")
    src_p, dst_p = Path(src).absolute(), Path(dst).absolute()
    if dst_p.resolve() == src_p.resolve() or src_p.resolve() in dst_p.resolve().parents \
            or dst_p.resolve() in src_p.resolve().parents:
        raise UserError(f"--dst {dst} and --src {src} must not hold one another")
    if preview is not None and (not preview.lower().endswith(".png") or not Path(preview).absolute().parent.is_dir()):
        raise UserError(f"--preview {preview} must be a .png file in an existing folder")
    if min_consistency is not None and (dino is None or not -1 <= min_consistency <= 1):
        raise UserError(f"--min-consistency {min_consistency} needs --dino DIR and a value in [-1, 1]")
    if dino is not None and not (Path(dino) / "config.json").is_file():
        raise UserError(f"--dino {dino}: no config.json there (a Hugging Face ViT folder: facebook/dino-vits16)")
    start = time.time()
    classes = read_classes(classes_file) if classes_file else {}
    subjects, skipped = scan(src_p, captions, classes, min_images, skip_small)
    consistency = None
    if dino is not None:
        subjects, consistency = filter_inconsistent(subjects, dino, min_consistency, progress)
    train, test = split_subjects([s.name for s in subjects], test_subjects, test_fraction, seed)
    by_name = {s.name: s for s in subjects}
    manifest: dict[str, Any] = {
        "tool": "jedi_jax.data.folder_sets", "source": str(src_p.resolve()), "resolution": resolution, "captions": captions,
        "classes_file": str(Path(classes_file).absolute()) if classes_file else None,
        "masks": subjects[0].masks[0] is not None, "seed": seed, "min_images": min_images, "skipped": skipped,
        "consistency": consistency, "splits": {}, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    total = sum(len(s.images) for s in subjects)
    # imports jax: after the checks, so mistakes fail fast
    from jedi_jax.convert.param_io import atomic_directory, atomic_file
    rows: list[tuple[str, dict]] = []
    # the preview is renamed into place after the folder, and only if the folder was
    with (atomic_file(preview) if preview is not None else contextlib.nullcontext()) as tmp_preview, \
            atomic_directory(dst_p, overwrite=overwrite, marker=MANIFEST) as tmp, \
            tqdm(total=total, desc="folder_sets", unit="image", disable=None if progress else True) as bar:
        for split, names in (("train", train), ("test", test)):
            if not names:
                continue

            def records(names=names):
                for name in names:
                    record = load_subject(by_name[name], resolution, bar)
                    if len(rows) < PREVIEW_SETS:
                        rows.append((name, record))
                    yield record

            write_array_record(str(tmp / f"{split}.array_record"), records(), flip_safe=True)
            manifest["splits"][split] = {
                "file": f"{split}.array_record", "num_subjects": len(names),
                "num_images": sum(len(by_name[n].images) for n in names),
                "subjects": [{"name": n, "subject": by_name[n].cls, "images": len(by_name[n].images)}
                             for n in names]}
        manifest["train_source"] = f"array_record:{dst_p / 'train.array_record'}"
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if tmp_preview is not None:
            _preview(rows, str(tmp_preview), resolution)
    manifest["seconds"] = round(time.time() - start, 2)
    return manifest


def run_tool(prog: str, argv: Sequence[str] | None, build_fn: Callable[[str], dict]) -> tuple[int, dict | None]:
    """(0, manifest) of build_fn(the command line, for the manifest); a user's mistake (UserError, or
    an OSError such as an existing --dst) is one `error:` line and (2, None), a Ctrl-C one line and
    (130, None): the builders write atomically, so nothing is left either way. Shared by the data tools."""
    command = f"{prog} {shlex.join(list(sys.argv[1:] if argv is None else argv))}"
    try:
        return 0, build_fn(command)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written (an existing --dst is unchanged)", file=sys.stderr)
        return 130, None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.data.folder_sets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder of subject folders of photos")
    p.add_argument("--dst", required=True, help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--resolution", type=int, required=True, help="side of the square images, a multiple of 8")
    p.add_argument("--captions", choices=CAPTION_MODES, default="auto")
    p.add_argument("--classes", default=None, help="subject_name,class table (DreamBench's prompts_and_classes.txt)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-subjects", type=int, default=0, help="whole subjects for test.array_record")
    split.add_argument("--test-fraction", type=float, default=0.0, help="fraction of the subjects for the test split")
    p.add_argument("--seed", type=int, default=0, help="picks the test subjects")
    p.add_argument("--min-images", type=int, default=2, help="fewest photos a subject may have")
    p.add_argument("--skip-small", action="store_true", help="leave out (warning) subjects under --min-images")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output once the new one is done")
    p.add_argument("--preview", default=None, metavar="PNG", help="also write a grid of the first sets and captions")
    p.add_argument("--dino", default=None, metavar="DIR",
                   help="Hugging Face DINO ViT folder (facebook/dino-vits16): record each subject's consistency")
    p.add_argument("--min-consistency", type=float, default=None, metavar="C",
                   help="leave out subjects whose photos' mean pairwise DINO cosine is below C (needs --dino)")
    args = p.parse_args(argv)
    rc, m = run_tool(p.prog, argv, lambda command: build(
        args.src, args.dst, args.resolution, captions=args.captions, classes_file=args.classes,
        test_subjects=args.test_subjects, test_fraction=args.test_fraction, seed=args.seed,
        min_images=args.min_images, skip_small=args.skip_small, overwrite=args.overwrite,
        preview=args.preview, dino=args.dino, min_consistency=args.min_consistency, command=command))
    if rc:
        return rc
    counts = ", ".join(f"{k} {v['num_subjects']} subjects / {v['num_images']} images" for k, v in m["splits"].items())
    print(f"folder_sets: {counts} at {args.resolution} px -> {Path(args.dst).absolute()} in {m['seconds']:.1f} s; "
          f"train with --config.data.source={m['train_source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
