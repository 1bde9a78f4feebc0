r"""DreamBench for JeDi: personalize each subject from k of its photos into the benchmark's prompts,
then score DINO, CLIP-I and CLIP-T.

The benchmark and its metrics are DreamBooth's (Ruiz et al., CVPR 2023, Sec. 4.1): 30 subjects (21
objects, 9 live: the cats and dogs), 25 prompts each (object and live-subject lists), and
  * DINO   = mean cosine similarity of DINO ViT-S/16 CLS embeddings between generated and real photos,
  * CLIP-I = the same with CLIP image embeddings,
  * CLIP-T = cosine similarity of a generated image's CLIP embedding and its prompt's.
JeDi (Zeng et al., CVPR 2024, Sec. 5) evaluates on it finetuning-free: the references are the first
k photos of the subject, the prompts name the class without DreamBooth's unique token ("a backpack in
the jungle"), and no weight changes. Real photos are the subject's photos, references included, as
in DreamBooth's protocol; the "real photos" row scores each photo against the subject's other ones
(DreamBooth's ceiling row).

Layout read (DreamBooth's dataset, and ../shared/dreambench): DATA/prompts_and_classes.txt and
DATA/<subject>/<NN>.jpg. Scorers are Hugging Face folders converted on load
(`jedi_jax.eval.image_text_embedders`): --dino facebook/dino-vits16, --clip
openai/clip-vit-large-patch14 (downloaded by you; nothing here downloads). Without them the run
generates and writes grids only, and says so.

    python -m jedi_jax.eval.dreambench --data /data/dreambooth/dataset --model /ckpt/jedi-sd15 \
        --out out/dreambench --k 1,3 --clip /models/clip-vit-large-patch14 --dino /models/dino-vits16

The run is resumable: every image is written whole (temporary file, then rename) and logged in
OUT/records.jsonl; re-running the same command continues where it stopped (Ctrl-C says so), and a
different protocol in the same OUT is refused, naming what differs (pass --overwrite to start again):
the settings, the model's weights (a hash of every component) and the benchmark's prompts and photos. Outputs: OUT/images/k<K>/<subject>/,
OUT/grids/k<K>_<subject>.png (references on top, one row per prompt), OUT/results.json,
OUT/report.md (mean over subjects with 95% bootstrap intervals, eval/metrics.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from jedi_jax.data.folder_sets import IMAGE_EXTS, MASK_SUFFIX
from jedi_jax.eval.cli import cli_at_least, cli_list, cli_model, cli_scales
from jedi_jax.eval.metrics import bootstrap_indices, fmt_ci, mean_ci, subject_means

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")  # DreamBooth's 9 live subjects are its cats and dogs
METRICS = ("dino", "clip_i", "clip_t")
RUN_FILE = "run.json"  # the protocol of the run in OUT: the marker that OUT is ours, and the resume check


class DreamBenchError(ValueError):
    """The benchmark folder or the run folder cannot be used as given (one line, names the problem)."""


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    cls: str  # the class word(s) the prompts use, e.g. "stuffed animal"
    photos: tuple[Path, ...]  # sorted by name; the first k are the references

    @property
    def live(self) -> bool:
        return self.cls in LIVE_CLASSES


@dataclasses.dataclass(frozen=True)
class Benchmark:
    subjects: tuple[Subject, ...]
    object_templates: tuple[str, ...]  # str.format templates: {0} unique token, {1} class
    live_templates: tuple[str, ...]

    def templates(self, subject: Subject) -> tuple[str, ...]:
        return self.live_templates if subject.live else self.object_templates


def prompt_text(template: str, cls: str, unique_token: str = "") -> str:
    """'a {0} {1} in the jungle' -> 'a backpack in the jungle' (JeDi needs no unique token)."""
    return " ".join(template.format(unique_token, cls).split())


def parse_prompts_file(text: str) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """DreamBooth's prompts_and_classes.txt -> ({subject: class}, object templates, live templates).

    The file is a 'subject_name,class' table after a 'Classes' line (read by the data tools'
    `folder_sets.parse_classes`), then two Python prompt lists after 'Object Prompts' and 'Live
    Subject Prompts', each entry 'a {0} {1} ...'.format(...)."""
    from jedi_jax.data.folder_sets import UserError, parse_classes

    if not any(line.strip().lower() == "classes" for line in text.splitlines()):
        raise DreamBenchError(f"{PROMPTS_FILE}: no 'Classes' line before the subject_name,class table")
    try:
        classes = parse_classes(text, PROMPTS_FILE)
    except UserError as e:
        raise DreamBenchError(str(e)) from None
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s.lower() in ("object prompts", "live subject prompts"):
            section = s.lower().split()[0]
        elif section in lists:
            m = re.match(r"""^(['"])(.*)\1\s*\.format\(""", s)
            if m:
                lists[section].append(m.group(2))
    for name, templates in lists.items():
        if not templates:
            raise DreamBenchError(f"{PROMPTS_FILE}: no {name} prompts ('a {{0}} {{1}} ...'.format(...) lines)")
        bad = [t for t in templates if "{1}" not in t]
        if bad:
            raise DreamBenchError(f"{PROMPTS_FILE}: prompt {bad[0]!r} has no {{1}} for the class")
    return classes, tuple(lists["object"]), tuple(lists["live"])


def read_benchmark(folder: str | os.PathLike) -> Benchmark:
    """The subjects present in `folder` (a subset of the table is fine: ../shared/dreambench has 10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DreamBenchError(f"--data {folder}: no such folder")
    if not (folder / PROMPTS_FILE).is_file():
        raise DreamBenchError(f"--data {folder}: no {PROMPTS_FILE} (DreamBooth's dataset folder holds it)")
    classes, object_templates, live_templates = parse_prompts_file((folder / PROMPTS_FILE).read_text())
    subjects = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = tuple(sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                              and not p.name.endswith(MASK_SUFFIX)))
        if not photos:
            continue
        if sub.name not in classes:
            raise DreamBenchError(f"--data {folder}: subject folder {sub.name!r} is not in {PROMPTS_FILE}'s class table")
        subjects.append(Subject(sub.name, classes[sub.name], photos))
    if not subjects:
        raise DreamBenchError(f"--data {folder}: no subject folders with photos")
    return Benchmark(tuple(subjects), object_templates, live_templates)


@dataclasses.dataclass
class Settings:
    k: tuple[int, ...] = (3,)  # rows: references per subject
    prompts: int | None = None  # the first N prompts of each list (None: all 25)
    seeds: int = 4  # images per prompt (DreamBooth: 4)
    steps: int = 50
    guidance_scale: float | None = None  # None: the model folder's recommendation
    image_guidance_scale: float | None = None
    subjects: tuple[str, ...] | None = None  # None: every subject in DATA
    reference_caption: str = "a photo of a {cls}"  # each reference's caption in the set

    def protocol(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def image_seed(subject: str, prompt_index: int, seed_index: int) -> int:
    """One seed per (subject, prompt, seed index), the same in every k row: rows differ only in k."""
    return zlib.crc32(f"{subject}/{prompt_index}/{seed_index}".encode())


def load_rgb(path: Path) -> np.ndarray:
    """A photo as uint8 (H, W, 3), EXIF-oriented (the scorers resize and crop it themselves)."""
    from jedi_jax.sampling.images import open_image, to_rgb

    return np.asarray(to_rgb(open_image(path)))


# ---------------------------------------------------------------------------------- the run folder


def _read_records(out: Path) -> list[dict]:
    """OUT/records.jsonl, which is then rewritten (atomically) with only these records: a last line
    cut short by a crash is dropped, with no fragment left for the next append to run on from (its
    image is generated again), and so is a record whose image is gone."""
    path = out / "records.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and (out / str(rec.get("image"))).is_file():
                records.append(rec)
        _write_atomic(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in records)))
    return records


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path), then the rename of param_io.atomic_file: never half a file at `path`."""
    from jedi_jax.convert.param_io import atomic_file

    with atomic_file(path) as tmp:
        write(tmp)


def check_out(out: Path, overwrite: bool) -> None:
    """OUT must be new, an empty folder, or an earlier run (it holds run.json: resumed, or replaced
    with --overwrite); checked before anything loads."""
    from jedi_jax.convert.param_io import check_destination

    if overwrite and (out / RUN_FILE).exists():
        try:
            check_destination(out, overwrite=True, marker=RUN_FILE)  # never replace the cwd, a link, ...
        except FileExistsError as e:
            raise DreamBenchError(f"--out {out}: {e}") from None
    elif out.exists() and not (out.is_dir() and ((out / RUN_FILE).exists() or not any(out.iterdir()))):
        raise DreamBenchError(f"--out {out} exists and holds no earlier DreamBench run ({RUN_FILE}): "
                              "give a new or empty folder")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def open_run(out: Path, protocol: dict, overwrite: bool) -> list[dict]:
    """Creates OUT (or resumes it when its run.json holds the same protocol); returns the records done."""
    check_out(out, overwrite)
    run_file = out / RUN_FILE
    if run_file.exists() and overwrite:
        import shutil

        shutil.rmtree(out)
    elif run_file.exists():
        before = json.loads(run_file.read_text())
        if before != protocol:
            changed = [f"{k} ({_shown(before.get(k))} -> {_shown(protocol.get(k))})"
                       for k in sorted(set(before) | set(protocol)) if before.get(k) != protocol.get(k)]
            raise DreamBenchError(f"--out {out} holds a run of another protocol, differing in {'; '.join(changed)}: "
                                  "re-run with its settings to resume, or pass --overwrite to start again")
        return _read_records(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_file, lambda p: p.write_text(json.dumps(protocol, indent=1) + "\n"))
    return []


def model_fingerprint(model) -> str:
    """sha256 of every component's weights: a resume with other weights in the same folder is refused."""
    from jedi_jax.convert.param_io import params_fingerprint

    return params_fingerprint({name: c.params for name, c in model.components.items()})


def data_fingerprint(bench: Benchmark) -> str:
    """sha256 of the prompt lists, the classes and every photo's bytes, in order (references included)."""
    import hashlib

    h = hashlib.sha256(json.dumps([bench.object_templates, bench.live_templates]).encode())
    for s in bench.subjects:
        h.update(f"{s.name}:{s.cls}:{len(s.photos)}".encode())
        for photo in s.photos:
            h.update(photo.name.encode() + photo.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- generation


def jobs(bench: Benchmark, settings: Settings) -> list[dict]:
    """Every image the protocol asks for, in order: (k, subject, prompt index, seed index)."""
    out = []
    for k in settings.k:
        for subject in bench.subjects:
            templates = bench.templates(subject)[: settings.prompts]
            for p, template in enumerate(templates):
                for s in range(settings.seeds):
                    out.append(dict(k=k, subject=subject.name, prompt_index=p, seed_index=s,
                                    prompt=prompt_text(template, subject.cls),
                                    seed=image_seed(subject.name, p, s),
                                    image=f"images/k{k}/{subject.name}/{p:02d}_s{s}.png"))
    return out


def generate(pipe, bench: Benchmark, settings: Settings, out: Path, done: list[dict], log=print) -> list[dict]:
    """Generates the images `done` lacks, appending each to OUT/records.jsonl once its file is whole."""
    from tqdm import tqdm

    by_name = {s.name: s for s in bench.subjects}
    finished = {r["image"] for r in done}
    todo = [j for j in jobs(bench, settings) if j["image"] not in finished]
    records = list(done)
    if not todo:
        return records
    log(f"[dreambench] {len(finished)} images done, {len(todo)} to generate")
    with open(out / "records.jsonl", "a") as log_file, tqdm(total=len(todo), desc="dreambench", unit="img") as bar:
        refs: dict[tuple[str, int], list[np.ndarray]] = {}  # decoded once per (subject, k)
        for job in todo:
            subject = by_name[job["subject"]]
            key = (subject.name, job["k"])
            if key not in refs:
                refs = {key: [load_rgb(p) for p in subject.photos[: job["k"]]]}
            captions = [settings.reference_caption.format(cls=subject.cls)] * job["k"]
            result = pipe([job["prompt"]], refs[key], reference_prompts=captions,
                          num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                          image_guidance_scale=settings.image_guidance_scale, seed=job["seed"])
            path = out / job["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, lambda p: result.images[0].save(p, format="PNG"))
            rec = dict(job, seconds=round(result.seconds["run"], 3))
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            records.append(rec)
            bar.update()
    return records


# ---------------------------------------------------------------------------------- scoring


def score(records: list[dict], bench: Benchmark, out: Path, scorers: dict) -> tuple[list[dict], dict]:
    """Adds dino / clip_i / clip_t to each record (those the given scorers allow); returns the records
    and the real-photo ceiling per subject {subject: {"dino": ..., "clip_i": ...}}.

    scorers: {"dino": DinoScorer, "clip": ClipScorer} (either may be absent)."""
    from jedi_jax.eval.image_text_embedders import embed_each, mean_pairwise_cosine

    real_embeds = {}  # (scorer name, subject) -> (M, D) unit rows
    ceiling: dict[str, dict] = {}
    for subject in bench.subjects:
        photos = [load_rgb(p) for p in subject.photos]  # sizes differ: each one preprocessed as it is
        ceiling[subject.name] = {}
        for name, metric in (("dino", "dino"), ("clip", "clip_i")):
            if name not in scorers:
                continue
            e = real_embeds[name, subject.name] = embed_each(scorers[name], photos)  # (M, D)
            if (pairs := mean_pairwise_cosine(e)) is not None:  # over ordered pairs of distinct photos
                ceiling[subject.name][metric] = pairs
    scored = []
    for subject in bench.subjects:
        mine = [r for r in records if r["subject"] == subject.name]
        if not mine:
            continue
        images = np.stack([load_rgb(out / r["image"]) for r in mine])  # (n, H, W, 3)
        values: dict[str, np.ndarray] = {}
        if "dino" in scorers:
            values["dino"] = (scorers["dino"].image_embeds(images) @ real_embeds["dino", subject.name].T).mean(1)
        if "clip" in scorers:
            img = scorers["clip"].image_embeds(images)  # (n, D)
            values["clip_i"] = (img @ real_embeds["clip", subject.name].T).mean(1)
            values["clip_t"] = np.sum(img * scorers["clip"].text_embeds([r["prompt"] for r in mine]), axis=1)
        for i, r in enumerate(mine):
            scored.append(dict(r, **{m: float(v[i]) for m, v in values.items()}))
    return scored, ceiling


def summarize(scored: list[dict], ceiling: dict, bench: Benchmark, settings: Settings) -> dict:
    """Per row (k, and the real photos): mean over subjects of each metric, with its 95% CI."""
    names = [s.name for s in bench.subjects]
    idx = bootstrap_indices(len(names))
    rows = {}
    for k in settings.k:
        recs = [r for r in scored if r["k"] == k]
        rows[f"JeDi k={k}"] = {m: mean_ci(subject_means(recs, m, names), idx) for m in METRICS
                               if any(m in r for r in recs)}
    real = {m: np.array([ceiling[n].get(m, np.nan) for n in names]) for m in ("dino", "clip_i")}
    rows["Real photos"] = {m: mean_ci(v, idx) for m, v in real.items() if not np.isnan(v).all()}
    return rows


def write_grids(records: list[dict], bench: Benchmark, settings: Settings, out: Path) -> None:
    """OUT/grids/k<K>_<subject>.png: the k references on top, one row of seeds per prompt below."""
    from jedi_jax.sampling.images import center_crop_resize, labeled_grid, open_image, to_rgb

    (out / "grids").mkdir(exist_ok=True)
    for k in settings.k:
        for subject in bench.subjects:
            mine = sorted((r for r in records if r["k"] == k and r["subject"] == subject.name),
                          key=lambda r: (r["prompt_index"], r["seed_index"]))
            if not mine:
                continue
            size = load_rgb(out / mine[0]["image"]).shape[0]
            refs = [np.asarray(center_crop_resize(to_rgb(open_image(p)), size)) for p in subject.photos[:k]]
            rows, labels = [refs], [[f"reference {i + 1}" for i in range(len(refs))]]
            for p in sorted({r["prompt_index"] for r in mine}):
                row = [r for r in mine if r["prompt_index"] == p]
                rows.append([load_rgb(out / r["image"]) for r in row])
                labels.append([row[0]["prompt"]] + [""] * (len(row) - 1))
            if not refs:  # k=0: text only
                rows, labels = rows[1:], labels[1:]
            grid = labeled_grid(rows, labels, cell=max(size, 128))
            _write_atomic(out / "grids" / f"k{k}_{subject.name}.png", lambda p: grid.save(p, format="PNG"))


def report(rows: dict, bench: Benchmark, settings: Settings, scorers: dict, seconds: float) -> str:
    present = [m for m in METRICS if any(m in r for r in rows.values())]
    lines = ["# DreamBench", "",
             f"{len(bench.subjects)} subjects ({sum(s.live for s in bench.subjects)} live), "
             f"{settings.prompts or len(bench.object_templates)} prompts x {settings.seeds} seeds, {settings.steps} steps; "
             f"mean over subjects with 95% bootstrap CI; {seconds:.0f} s.", ""]
    if not present:
        lines += ["No metrics: pass --dino and/or --clip (Hugging Face folders) to score the images.", ""]
        return "\n".join(lines)
    lines += ["| row | " + " | ".join({"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}[m] for m in present) + " |",
              "|---" * (len(present) + 1) + "|"]
    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt_ci(stats[m]) if m in stats else "-" for m in present) + " |")
    missing = [n for n, key in (("DINO", "dino"), ("CLIP-I and CLIP-T", "clip")) if key not in scorers]
    if missing:
        lines += ["", f"Not scored: {', '.join(missing)} (no scorer folder given)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the benchmark


def select(bench: Benchmark, settings: Settings) -> Benchmark:
    """The subjects settings ask for, each with photos enough for the largest k."""
    if settings.subjects is not None:
        unknown = sorted(set(settings.subjects) - {s.name for s in bench.subjects})
        if unknown:
            raise DreamBenchError(f"--subjects: {', '.join(unknown)} not in the benchmark folder")
        bench = dataclasses.replace(bench, subjects=tuple(s for s in bench.subjects if s.name in settings.subjects))
    most = min(len(bench.object_templates), len(bench.live_templates))
    if settings.prompts is not None and settings.prompts > most:
        raise DreamBenchError(f"--prompts {settings.prompts}: the benchmark's prompt lists hold {most}")
    short = [s for s in bench.subjects if len(s.photos) < max(settings.k)]
    if short:
        raise DreamBenchError(f"--k {max(settings.k)}: subject {short[0].name} has only {len(short[0].photos)} photos")
    return bench


def run(pipe, bench: Benchmark, out: str | Path, settings: Settings, *, scorers: dict | None = None,
        overwrite: bool = False, log=print) -> dict:
    """Generates (resuming), scores, and writes grids, results.json and report.md to `out`."""
    out, scorers, start = Path(out), scorers or {}, time.time()
    bench = select(bench, settings)
    if max(settings.k) > pipe.max_references:
        raise DreamBenchError(f"--k {max(settings.k)}: the pipeline holds at most {pipe.max_references} references")
    settings = dataclasses.replace(settings)
    settings.guidance_scale, settings.image_guidance_scale = pipe.guidance_scales(settings.guidance_scale,
                                                                                 settings.image_guidance_scale)
    protocol = dict(settings.protocol(), model=str(Path(pipe.model.folder).resolve()),
                    model_weights=model_fingerprint(pipe.model), data=data_fingerprint(bench),
                    subjects=[s.name for s in bench.subjects])
    records = generate(pipe, bench, settings, out, open_run(out, protocol, overwrite), log=log)
    write_grids(records, bench, settings, out)
    # no scorer, nothing to score: the photos and images are not decoded again
    scored, ceiling = score(records, bench, out, scorers) if scorers else (records, {s.name: {} for s in bench.subjects})
    rows = summarize(scored, ceiling, bench, settings) if scorers else {}
    seconds = time.time() - start
    results = dict(protocol=protocol, scorers=sorted(scorers), rows=rows, images=scored, real_photos=ceiling,
                   seconds_generation=float(sum(r["seconds"] for r in records)))
    _write_atomic(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    text = report(rows, bench, settings, scorers, seconds)
    _write_atomic(out / "report.md", lambda p: p.write_text(text))
    log(f"[dreambench] wrote {out}/report.md, results.json, grids/ ({len(records)} images, {seconds:.0f} s)")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.dreambench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="DreamBench folder: prompts_and_classes.txt and <subject>/ photos")
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", default="out/dreambench")
    p.add_argument("--k", default="3", help="comma-separated reference counts, one row each (default 3)")
    p.add_argument("--subjects", default=None, help="comma-separated subject names (default: all in --data)")
    p.add_argument("--prompts", type=int, default=None, help="the first N prompts of each list (default: all 25)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4, as DreamBooth)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=None, help="sT (default: the model's recommended)")
    p.add_argument("--image-guidance-scale", type=float, default=None, help="sI (default: the model's recommended)")
    p.add_argument("--dino", default=None, help="Hugging Face DINO ViT folder (facebook/dino-vits16)")
    p.add_argument("--clip", default=None, help="Hugging Face CLIP folder (openai/clip-vit-large-patch14)")
    p.add_argument("--scorer-device", default="cpu", choices=("cpu", "default"),
                   help="where DINO and CLIP run: the host CPU (default; leaves accelerator memory to the "
                        "generator) or JAX's default device")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out holding another run")
    args = p.parse_args(argv)
    ks = tuple(sorted(set(cli_list(p, "--k", args.k, int))))  # a row per distinct k, in order
    cli_at_least(p, prompts=(args.prompts, 1), seeds=(args.seeds, 1), steps=(args.steps, 1), k=(min(ks), 0))
    cli_scales(p, guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale)
    for flag, folder in (("--dino", args.dino), ("--clip", args.clip)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            p.error(f"{flag} {folder}: no config.json there (a Hugging Face model folder)")
    settings = Settings(k=ks, prompts=args.prompts, seeds=args.seeds, steps=args.steps,
                        guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
                        subjects=tuple(x.strip() for x in args.subjects.split(",") if x.strip()) if args.subjects else None)
    try:  # the benchmark folder, the subjects and --out are checked before anything loads
        bench = select(read_benchmark(args.data), settings)
        check_out(Path(args.out), args.overwrite)
    except DreamBenchError as e:
        p.error(str(e))
    model = cli_model(args.model)
    if model is None:
        return 2
    import jax

    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.eval.image_text_embedders import ClipScorer, DinoScorer
    from jedi_jax.pipeline import JeDiPipeline

    device = None if args.scorer_device == "cpu" else jax.devices()[0]
    try:
        scorers = {}
        if args.dino:
            scorers["dino"] = DinoScorer.from_folder(args.dino, device=device)
        if args.clip:
            scorers["clip"] = ClipScorer.from_folder(args.clip, device=device)
        pipe = JeDiPipeline.from_pretrained(model, max_references=max(max(ks), 1))
        run(pipe, bench, args.out, settings, scorers=scorers, overwrite=args.overwrite)
    except (DreamBenchError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every image written so far is whole and logged
        print(f"error: interrupted: the images written are kept in {args.out}; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
