"""MiniBench: JeDi's personalization measured on the mini world, with baselines and ablations.

    python -m jedi_jax.eval.minibench [--model DIR] [--out DIR] [--subjects 16] [--seeds 2] [--steps 50] [--quick]

The task (JeDi, CVPR 2024, Sec. 5, transplanted to a world with exact ground truth): for each of
``--subjects`` TEST-split subjects (never seen in training), give the model k = 1 or 3 REFERENCE
renders of the subject in random training-like contexts with their captions as reference prompts,
and ask for ``--prompts`` prompted contexts whose (background, placement) pair training never
rendered (``mw.HELDOUT_COMBOS``), under ``--seeds`` seeds. Every row sees the same subjects,
references, prompts and initial noise (paired comparison). The ground truth of a prompt is the mini
world's render of the subject in exactly that context.

Scores per image (``metrics.py``): encoder identity vs the references (``identity_encoder.py``,
contrastive CNN) and vs an unseen gallery of the subject; model-free pixel identity (palette and
texture inside the ground-truth mask); prompt fidelity = context classifier (``context_classifier.py``)
reading back the prompted background and placement. Identity is also reported NORMALIZED:
0 = text-only generation (k=0), 1 = ground-truth renders. CIs: 95% bootstrap over subjects.

Rows: see ``ROWS``. Outputs in --out: report.md, results.json, identity_vs_rows.png, grids/*.png
(written by ``minibench_report.py``).

For a training curve, ``quick_identity(pipe_or_dir, n_subjects=8)`` returns the normalized encoder
identity of JeDi k=3 in well under a minute on a small model (few subjects, 20 steps).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jedi_jax.data import mini_world as mw
from jedi_jax.data.pool import PLACEMENT_ONLY
from jedi_jax.eval import metrics as M
from jedi_jax.eval.minibench_report import plot, report, write_grid
from jedi_jax.sampling.guidance import ORDERS

BENCH_TAG = 4242  # seed space of MiniBench's references / prompts / galleries
# The "composed prompt" row's parts: the full prompt's labels said as placement AND background. Each
# part is the start of a training caption template (pool.PLACEMENT_ONLY[0] is FULL_TEMPLATE cut after
# the placement; the other is TEMPLATES[7] cut before it), so neither part is new wording.
COMPOSED_PARTS = (PLACEMENT_ONLY[0], "a photo of a {size} {orient} {cat} {bgp}")
NUM_REFERENCES = 3
GALLERY = 3
# What the references are captioned with at sampling (generate): their own captions, or "" (the
# pipeline's default when a user gives none; captions are dropped per member in training).
REFERENCE_CAPTIONS = ("given", "empty")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str
    meaning: str
    k: int = 3  # references shown
    image_scale: float | None = None  # None = the run's image_guidance_scale
    coupled: bool = True
    composed: bool = False  # prompt given as COMPOSED_PARTS joined by " AND " (pipeline: composed prompts)


ROWS: tuple[Row, ...] = (
    Row("ground_truth", "Ground truth", "the mini world's render of the subject in the prompted context (ceiling)", 0),
    Row("text_only", "Text-only (k=0)", "the model with no reference: prompt only (identity floor)", 0),
    Row("copy_reference", "Copy reference", "returns reference 1 unchanged (identity without prompt following)", 1),
    Row("jedi_k1", "JeDi k=1", "joint set inpainting with reference 1 and its caption", 1),
    Row("jedi_k3", "JeDi k=3", "joint set inpainting with references 1-3 and their captions", 3),
    Row("dreambooth", "DreamBooth k=3", "UNet finetuned on references 1-3 (sets of one, their captions), "
        "then text-only generation", 3),
    Row("jedi_k3_sI2", "JeDi k=3, sI=2", "image guidance at 2 (the pipeline's generic default; the JeDi rows above "
        "use the model folder's recommended sI, chosen on validation subjects)", 3, image_scale=2.0),
    Row("jedi_k3_sI1", "JeDi k=3, sI=1", "no EXTRA image guidance: e(I,noT) + sT (e(I,T) - e(I,noT)); the "
        "references condition every branch at scale 1", 3, image_scale=1.0),
    Row("jedi_k3_sI0", "JeDi k=3, sI=0", "image guidance formula at sI=0: e(noI,noT) + sT (e(I,T) - e(I,noT)); "
        "references enter only through the text-difference term", 3, image_scale=0.0),
    Row("jedi_k3_uncoupled", "JeDi k=3, no coupled attn", "coupled attention removed at inference (each member "
        "its own set): references cannot reach the target; expected ~ text-only", 3, coupled=False),
    Row("jedi_k3_composed", "JeDi k=3, composed prompt", "the same prompt said as two parts, placement AND "
        "background (COMPOSED_PARTS), each part guided on its own (composable guidance; one more UNet branch): "
        "does the model compose a held-out pair it cannot follow as one sentence?", 3, composed=True),
)
ROW_NAMES = tuple(r.name for r in ROWS)


@dataclasses.dataclass
class Settings:
    subjects: int = 16
    seeds: int = 2
    prompts: int = 2  # prompted contexts per subject
    steps: int = 50
    guidance_scale: float | None = None  # None: the model folder's recommended (JeDiPipeline.guidance_scales)
    image_guidance_scale: float | None = None
    guidance_order: str | None = None  # None: the model folder's (JeDiPipeline.guidance_order)
    sampler: str = "ddim"
    dreambooth_steps: int = 400
    dreambooth_lr: float = 2e-4  # the better of 5e-5 and 2e-4 on eval.dreambooth_curve
    dreambooth_subjects: int = 8
    rows: tuple[str, ...] = ROW_NAMES
    grid_subjects: int = 16  # subjects with a sample grid in OUT/grids/ (the first N)
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> "Settings":
        return cls(subjects=2, seeds=1, prompts=1, steps=5, dreambooth_steps=3, dreambooth_subjects=2,
                   grid_subjects=2, quick=True)


# ---------------------------------------------------------------------------------- cases


def make_case(index: int, num_prompts: int) -> dict[str, Any]:
    """Test subject `index`: references (training-like contexts with distinct backgrounds, large,
    upright except the last one, as the shipped examples), prompts in held-out (background,
    placement) pairs with their ground truth, and a gallery of unseen test-context renders."""
    subject = mw.subject_for("test", index)
    rng = np.random.default_rng([BENCH_TAG, index])
    refs, masks, captions, used, places = [], [], [], [], []
    for j in range(NUM_REFERENCES):
        ctx = mw.sample_context(rng, "train", exclude_backgrounds=used)
        ctx = mw.make_context(ctx.background, ctx.placement, size="large",
                              orientation=int(j == NUM_REFERENCES - 1), seed=ctx.bg_seed)
        used.append(ctx.background)
        places.append(mw.PLACEMENTS[ctx.placement])
        image, mask = mw.render(subject, ctx)
        refs.append(image)
        masks.append(mask)
        captions.append(mw.caption(subject, ctx, rng))
    combos = [mw.HELDOUT_COMBO_IDS[i] for i in rng.permutation(len(mw.HELDOUT_COMBO_IDS))]
    prompts = []
    for j in range(num_prompts):
        b, p = combos[j % len(combos)]
        ctx = mw.make_context(b, p, size=int(rng.integers(2)), orientation=int(rng.integers(2)),
                              seed=int(rng.integers(2**31 - 1)), jitter=False)
        gt, gt_mask = mw.render(subject, ctx)
        composed = " AND ".join(mw.prompt_for(subject.category, ctx, part) for part in COMPOSED_PARTS)
        prompts.append(dict(prompt=mw.prompt_for(subject.category, ctx), composed=composed, context=ctx, gt=gt,
                            gt_mask=gt_mask))
    gallery = []
    for _ in range(GALLERY):
        gallery.append(mw.render(subject, mw.sample_context(rng, "test"))[0])
    return dict(index=index, name=subject.name, subject=subject, ref_images=np.stack(refs),
                ref_masks=np.stack(masks), ref_captions=captions, ref_placements=places,
                ref_backgrounds=[mw.BACKGROUNDS[b] for b in used], prompts=prompts,
                gallery=np.stack(gallery))


def call_seed(case_index: int, prompt_index: int, seed_index: int) -> int:
    """Pipeline seed, identical across rows (paired: same initial noise for every method)."""
    return 7919 * seed_index + 101 * case_index + prompt_index


# ---------------------------------------------------------------------------------- scoring


class Scorer:
    """Loads the shipped evaluators once; scores images against a case."""

    def __init__(self, folder: str | None = None):
        from jedi_jax.eval.context_classifier import load_context_classifier
        from jedi_jax.eval.identity_encoder import load_identity_encoder

        self.encoder = load_identity_encoder(folder)
        self.classifier = load_context_classifier(folder)
        self._cache: dict[int, dict] = {}

    def _case_state(self, case: dict) -> dict:
        if case["index"] not in self._cache:
            self._cache[case["index"]] = dict(
                refs=self.encoder.embed(case["ref_images"]), gallery=self.encoder.embed(case["gallery"]),
                pixels=M.PixelReference(case["ref_images"], case["ref_masks"]))
        return self._cache[case["index"]]

    def score(self, case: dict, prompt_index: int, images: np.ndarray) -> list[dict]:
        """images uint8 (M, H, W, 3) generated for case's prompt -> one record per image."""
        from jedi_jax.eval.cnn import to_input

        st = self._case_state(case)
        prompt = case["prompts"][prompt_index]
        images = np.asarray(images)
        if images.shape[1:3] != (mw.RES, mw.RES):
            images = ((to_input(images) + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
        emb = self.encoder.embed(images)
        pred = self.classifier.predict(images)
        labels = prompt["context"].labels
        out = []
        for i, image in enumerate(images):
            rec = dict(enc_ref=M.cosine_to_set(emb[i], st["refs"]), enc_gallery=M.cosine_to_set(emb[i], st["gallery"]))
            rec.update(st["pixels"].score(image, prompt["gt_mask"]))
            for head in ("background", "placement", "size", "orientation"):
                rec[f"{head}_ok"] = float(pred[head][i] == labels[head])
            # both labels as prompted: every prompt names a held-out pair, so this is composition
            rec["context_ok"] = rec["background_ok"] * rec["placement_ok"]
            # the prompted pair and where the subject went, by name: placement_by_pair's inputs
            rec.update(prompt_background=mw.BACKGROUNDS[labels["background"]],
                       prompt_placement=mw.PLACEMENTS[labels["placement"]],
                       placement_pred=mw.PLACEMENTS[int(pred["placement"][i])])
            out.append(rec)
        return out


# ---------------------------------------------------------------------------------- generation


def _load_pipeline(pipe_or_dir, max_references: int = NUM_REFERENCES):
    from jedi_jax.pipeline import JeDiPipeline

    if isinstance(pipe_or_dir, JeDiPipeline):
        return pipe_or_dir
    return JeDiPipeline.from_pretrained(pipe_or_dir, max_references=max_references)


def placement_contrast_prompt(case: dict, prompt_index: int, weight: float) -> str:
    """Case's prompt as a weighted composed prompt that guides placement alone harder:
    "P(x) :1+w AND P(y) :-w/2 AND P(z) :-w/2", where P(y), P(z) are the same sentence at the other
    two placements. With text_layer="embeddings" only the placement token differs between the parts,
    so the extra term w (d_x - mean d_others) is a pure placement direction (eval.guidance_sweep)."""
    prompt = case["prompts"][prompt_index]
    ctx, category = prompt["context"], case["subject"].category
    others = [mw.prompt_for(category, dataclasses.replace(ctx, placement=q))
              for q in range(len(mw.PLACEMENTS)) if q != ctx.placement]
    return " AND ".join([f"{prompt['prompt']} :{1 + weight:g}"] + [f"{o} :{-weight / len(others):g}" for o in others])


def generate(pipe, case: dict, prompt_index: int, seed: int, k: int, *, steps: int, guidance_scale: float,
             image_guidance_scale: float, sampler: str = "ddim", eta: float = 0.0, prompt: str | None = None,
             image_guidance_interval: tuple[float, float] | None = None,
             guidance_order: str | None = None, reference_start: float = 0.0,
             reference_captions: str = "given") -> tuple[np.ndarray, dict]:
    """One image for case's prompt (or for `prompt`, another wording of it, e.g. its "composed" form)
    with the first k references; guidance_order None = the model folder's; reference_start: the part of
    the trajectory run without the references (pipeline.reference_steps); reference_captions: "given"
    (each reference's own caption) or "empty" ("", the pipeline's default when a user gives none).
    Returns (uint8 (H, W, 3), seconds)."""
    if reference_captions not in REFERENCE_CAPTIONS:
        raise ValueError(f"unknown reference_captions {reference_captions!r}; choose one of {REFERENCE_CAPTIONS}")
    k = min(k, pipe.max_references)
    if prompt is None:
        prompt = case["prompts"][prompt_index]["prompt"]
    ref_prompts = list(case["ref_captions"][:k]) if reference_captions == "given" else [""] * k
    out = pipe([prompt], list(case["ref_images"][:k]),
               reference_prompts=ref_prompts, num_inference_steps=steps,
               guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
               image_guidance_interval=image_guidance_interval, guidance_order=guidance_order,
               reference_start=reference_start, sampler=sampler,
               eta=eta, seed=seed)
    return np.asarray(out.images[0]), out.seconds


def _row_images(row: Row, case, pipes, settings: Settings, dreambooth, timing) -> dict:
    """{(prompt_index, seed_index): uint8 image} for one row and one case (runs the model)."""
    from jedi_jax.eval.dreambooth import unet_params_swapped

    images = {}
    keys = [(p, s) for p in range(len(case["prompts"])) for s in range(settings.seeds)]
    if row.name == "ground_truth":
        return {(p, s): case["prompts"][p]["gt"] for p, s in keys}
    if row.name == "copy_reference":
        return {(p, s): case["ref_images"][0] for p, s in keys}
    pipe = pipes["coupled" if row.coupled else "uncoupled"]
    k = 0 if row.name in ("text_only", "dreambooth") else row.k
    sI = settings.image_guidance_scale if row.image_scale is None else row.image_scale
    context = _nullcontext()
    if row.name == "dreambooth":
        params, info = dreambooth.finetune(case["ref_images"][:row.k], case["ref_captions"][:row.k],
                                           seed=case["index"])
        timing.setdefault("finetune_seconds", []).append(info["seconds"])
        timing.setdefault("finetune_losses", []).append(info["losses"])
        context = unet_params_swapped(pipe, params)
    with context:
        for p, s in keys:
            images[(p, s)], sec = generate(pipe, case, p, call_seed(case["index"], p, s), k, steps=settings.steps,
                                           guidance_scale=settings.guidance_scale, image_guidance_scale=sI,
                                           sampler=settings.sampler,
                                           prompt=case["prompts"][p]["composed"] if row.composed else None,
                                           # composed prompts take only the paper's order (sampling/guidance.py)
                                           guidance_order="image_first" if row.composed else settings.guidance_order)
            timing["compile"] = timing.get("compile", 0.0) + sec["compile"]
            timing["run"] = timing.get("run", 0.0) + sec["run"]
            timing["images"] = timing.get("images", 0) + 1
    return images


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------- the benchmark


def run(model, out: str | Path, settings: Settings, *, evaluators: str | None = None, log=print) -> dict:
    """Runs MiniBench on `model` (a folder or a JeDiPipeline); writes the outputs to `out`; returns results."""
    from jedi_jax.eval.dreambooth import DreamBooth
    from jedi_jax.pipeline import JeDiPipeline

    start = time.time()
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if r.name in settings.rows]
    pipe = _load_pipeline(model)
    settings = dataclasses.replace(settings)  # the caller's stays as given
    settings.guidance_scale, settings.image_guidance_scale = pipe.guidance_scales(settings.guidance_scale,
                                                                                 settings.image_guidance_scale)
    settings.guidance_order = pipe.guidance_order(settings.guidance_order)
    pipes = {"coupled": pipe}
    if any(not r.coupled for r in rows):
        pipes["uncoupled"] = JeDiPipeline(pipe.model, max_references=pipe.max_references, text_layer=pipe.text_layer,
                                          coupled_attention=False)
    dreambooth = (DreamBooth(pipe, steps=settings.dreambooth_steps, lr=settings.dreambooth_lr)
                  if "dreambooth" in settings.rows else None)
    scorer = Scorer(evaluators)
    log(f"[minibench] model {pipe.model.folder} loaded, evaluators ready ({time.time() - start:.0f} s)")

    cases = [make_case(i, settings.prompts) for i in range(settings.subjects)]
    records: list[dict] = []
    timings: dict[str, dict] = {r.name: {} for r in rows}
    samples: dict[str, dict] = {}  # case name -> row -> [seed-0 image per prompt]
    for case in cases:
        t_case = time.time()
        samples[case["name"]] = {}
        for row in rows:
            if row.name == "dreambooth" and case["index"] >= settings.dreambooth_subjects:
                continue
            t0 = time.time()
            images = _row_images(row, case, pipes, settings, dreambooth, timings[row.name])
            timings[row.name]["wall"] = timings[row.name].get("wall", 0.0) + time.time() - t0
            for (p, s), image in images.items():
                rec = scorer.score(case, p, image[None])[0]
                rec.update(row=row.name, subject=case["name"], prompt=case["prompts"][p]["prompt"], seed_index=s,
                           # where the references this row was shown put the subject (Row.k = 0: none)
                           ref_placements=case["ref_placements"][:row.k],
                           ref_backgrounds=case["ref_backgrounds"][:row.k])
                records.append(rec)
            samples[case["name"]][row.name] = [images[(p, 0)] for p in range(len(case["prompts"]))]
        log(f"[minibench] {case['name']}: {len(rows)} rows in {time.time() - t_case:.1f} s")
        if case["index"] < settings.grid_subjects:
            write_grid(out / "grids" / f"{case['name']}.png", case, samples[case["name"]], rows)
    if dreambooth is not None:
        timings["dreambooth"]["finetune_compile"] = dreambooth.compile_seconds

    results = summarize(records, [c["name"] for c in cases], rows)
    results["checks"] = sanity_checks(records)
    results["placement_by_pair"] = placement_by_pair(records, [r.name for r in rows])
    results.update(settings=_settings_dict(settings, pipe), timings=_timings(timings),
                   evaluators=_evaluator_info(scorer), seconds_total=round(time.time() - start, 1),
                   records=records)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    plot(results, out / "identity_vs_rows.png")
    (out / "report.md").write_text(report(results))
    log(f"[minibench] wrote {out}/report.md, results.json, identity_vs_rows.png, grids/ "
        f"({time.time() - start:.0f} s)")
    return results


def summarize(records: list[dict], subjects: list[str], rows: list[Row]) -> dict:
    """Per row: mean + 95% bootstrap CI (over subjects) of every score, and normalized identities."""
    idx = M.bootstrap_indices(len(subjects))
    # records of older results.json lack context_ok (both labels as prompted); it follows from the two
    records = [x if "context_ok" in x else {**x, "context_ok": x["background_ok"] * x["placement_ok"]} for x in records]
    by_row = {r.name: [x for x in records if x["row"] == r.name] for r in rows}
    keys = ("enc_ref", "enc_gallery", "pix", "palette", "texture", "background_ok", "placement_ok", "context_ok",
            "size_ok", "orientation_ok")
    per_subject = {r: {k: M.subject_means(by_row[r], k, subjects) for k in keys} for r in by_row}
    table = {}
    for r in rows:
        entry = {k: M.mean_ci(per_subject[r.name][k], idx) for k in keys}
        entry["images"] = len(by_row[r.name])
        if "ground_truth" in per_subject and "text_only" in per_subject:
            for k in ("enc_ref", "enc_gallery", "pix"):
                entry[f"{k}_normalized"] = M.normalized_ci(per_subject[r.name][k], per_subject["text_only"][k],
                                                           per_subject["ground_truth"][k], idx)
        table[r.name] = entry
    return dict(rows=table, row_info={r.name: dict(label=r.label, meaning=r.meaning) for r in rows},
                subjects=subjects, ci="95% percentile bootstrap over subjects (2000 resamples, paired across rows)")


def placement_by_pair(records: list[dict], rows: list[str]) -> dict:
    """Placement accuracy per prompted (background, placement) pair, and where the misses went.

    -> {row: {"pairs": {"beach / right": {"acc", "n", "went": {placement: count of misses}}},
              "misses", "to_reference", "to_reference_chance",
              "by_reference_background": {"shown" | "not shown": {"acc", "n"}}}}.
    Every prompt is a held-out pair, and training rendered each background with only the other 2
    placements, so every miss is a placement the model saw with that background
    (mini_world.HELDOUT_COMBOS). to_reference counts the misses that went to a placement one of the
    row's references shows; to_reference_chance is its expectation if a miss picked either wrong
    placement at random: do the references lend their layout? by_reference_background splits the
    accuracy by whether one of the row's references shows the prompted background (records without
    ref_backgrounds count as "not shown"): does a reference on the same background pull the subject
    to its own placement? Records without the prompted labels (older results.json) are skipped.
    """
    out: dict[str, dict] = {}
    for row in rows:
        cells: dict[str, dict] = {}
        split = {"shown": [0, 0], "not shown": [0, 0]}  # [hits, n]
        misses, to_ref, chance = 0, 0, 0.0
        for r in records:
            if r["row"] != row or "prompt_placement" not in r:
                continue
            cell = cells.setdefault(f"{r['prompt_background']} / {r['prompt_placement']}",
                                    dict(hits=0, n=0, went={}))
            cell["n"] += 1
            bucket = split["shown" if r["prompt_background"] in (r.get("ref_backgrounds") or ()) else "not shown"]
            bucket[0] += bool(r["placement_ok"])
            bucket[1] += 1
            if r["placement_ok"]:
                cell["hits"] += 1
                continue
            cell["went"][r["placement_pred"]] = cell["went"].get(r["placement_pred"], 0) + 1
            shown = set(r.get("ref_placements") or ())
            misses += 1
            to_ref += r["placement_pred"] in shown
            wrong = [p for p in mw.PLACEMENTS if p != r["prompt_placement"]]
            chance += sum(p in shown for p in wrong) / len(wrong)
        if cells:
            out[row] = dict(pairs={pair: dict(acc=c["hits"] / c["n"], n=c["n"], went=c["went"])
                                   for pair, c in sorted(cells.items())},
                            misses=misses, to_reference=to_ref, to_reference_chance=chance,
                            by_reference_background={k: dict(acc=h / n, n=n) for k, (h, n) in split.items() if n})
    return out


def sanity_checks(records: list[dict]) -> dict:
    """Paired differences that must (nearly) vanish: without coupled attention the references have
    no path to the target, so that row should reproduce text-only image for image."""
    key = lambda r: (r["subject"], r["prompt"], r["seed_index"])  # noqa: E731
    text = {key(r): r["enc_ref"] for r in records if r["row"] == "text_only"}
    unc = {key(r): r["enc_ref"] for r in records if r["row"] == "jedi_k3_uncoupled"}
    common = text.keys() & unc.keys()
    if not common:
        return {}
    return dict(uncoupled_vs_text_only_max_abs_enc_diff=float(max(abs(text[c] - unc[c]) for c in common)))


def _settings_dict(settings: Settings, pipe) -> dict:
    d = dataclasses.asdict(settings)
    meta = pipe.model.folder / "jedi_model.json"
    d.update(model=str(pipe.model.folder), resolution=pipe.resolution, max_references=pipe.max_references,
             model_source=json.loads(meta.read_text()).get("source") if meta.exists() else None,
             prompt_contexts="held-out (background, placement) pairs, 'heldout' split, jitter-free",
             reference_contexts="train-split contexts, distinct backgrounds, large, last one tilted",
             subjects_split="test (indices 0..subjects-1)")
    return d


def _timings(t: dict) -> dict:
    out = {}
    for row, d in t.items():
        e = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()
             if k not in ("finetune_seconds", "finetune_losses")}
        if d.get("images"):
            e["seconds_per_image"] = round(d["run"] / d["images"], 3)
        if d.get("finetune_seconds"):
            e["finetune_minutes_per_subject"] = round(float(np.mean(d["finetune_seconds"])) / 60, 3)
            e["finetune_subjects"] = len(d["finetune_seconds"])
            e["finetune_losses"] = d["finetune_losses"]
        out[row] = e
    return out


def _evaluator_info(scorer: Scorer) -> dict:
    return {name: dict(validation=ev.meta.get("validation"), retrain=ev.meta.get("retrain"))
            for name, ev in (("identity_encoder", scorer.encoder), ("context_classifier", scorer.classifier))}


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


# ---------------------------------------------------------------------------------- training curve


_QUICK_CACHE: dict = {}


def quick_identity(model, n_subjects: int = 8, *, steps: int = 20, k: int = 3, seed: int = 0,
                   unet_params=None, guidance_scale: float = 3.0, image_guidance_scale: float = 2.0,
                   evaluators: str | None = None) -> dict:
    """The normalized encoder identity of JeDi (k references) on `n_subjects` test subjects, one
    held-out prompt each, one seed, `steps` DDIM steps -- for a training learning curve.

    model: a JeDiPipeline (reused: its compiled sampler is cached, so repeated calls do not
    recompile) or a model folder. unet_params: evaluate these UNet parameters instead of the
    pipeline's (e.g. the trainer's current EMA params; same structure), without reloading.
    Text-only generation (the 0 point) is rerun with the same parameters, since it moves with
    training too; the ground truth (the 1 point) is cached.

    Returns {'normalized': float, 'jedi': mean cos, 'text_only': ..., 'ground_truth': ...,
    'placement_acc', 'background_acc' (of the JeDi images), 'seconds'}.

    In a training loop (the UNet params must have the pipeline's structure and live on one device;
    gather sharded params with ``jax.device_get`` first):

        pipe = JeDiPipeline.from_pretrained(exported_model_dir, max_references=3)   # once
        if step % K == 0:
            curve.append((step, quick_identity(pipe, unet_params=ema_params)["normalized"]))
    """
    from jedi_jax.eval.dreambooth import unet_params_swapped

    start = time.time()
    if not hasattr(model, "max_references"):  # a folder: build its pipeline once per process
        key = ("pipe", str(Path(model).resolve()))
        model = _QUICK_CACHE[key] = _QUICK_CACHE.get(key) or _load_pipeline(model)
    pipe = model
    scorer = _QUICK_CACHE.get(("scorer", evaluators)) or Scorer(evaluators)
    _QUICK_CACHE[("scorer", evaluators)] = scorer
    cases = [make_case(i, 1) for i in range(n_subjects)]
    swap = unet_params_swapped(pipe, unet_params) if unet_params is not None else _nullcontext()
    scores = {"jedi": [], "text_only": [], "ground_truth": []}
    fidelity = {"background_ok": [], "placement_ok": []}
    with swap:
        for case in cases:
            for name, kk in (("jedi", k), ("text_only", 0)):
                image, _ = generate(pipe, case, 0, call_seed(case["index"], 0, seed), kk, steps=steps,
                                    guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale)
                rec = scorer.score(case, 0, image[None])[0]
                scores[name].append(rec["enc_ref"])
                if name == "jedi":
                    for key in fidelity:
                        fidelity[key].append(rec[key])
            scores["ground_truth"].append(scorer.score(case, 0, case["prompts"][0]["gt"][None])[0]["enc_ref"])
    means = {name: float(np.mean(v)) for name, v in scores.items()}
    den = means["ground_truth"] - means["text_only"]
    normalized = (means["jedi"] - means["text_only"]) / den if abs(den) > 1e-9 else float("nan")
    return dict(normalized=normalized, **means, background_acc=float(np.mean(fidelity["background_ok"])),
                placement_acc=float(np.mean(fidelity["placement_ok"])), n_subjects=n_subjects, steps=steps,
                seconds=time.time() - start)


# ---------------------------------------------------------------------------------- CLI


def cli_model(arg: str | None) -> Path | None:
    """The eval CLIs' --model: a jedi_jax model folder, default the embedded JeDi-mini; None (after
    one error line on stderr) when there is no model there."""
    from jedi_jax.assets import DEFAULT_MODEL_DIR

    model = Path(arg) if arg else DEFAULT_MODEL_DIR
    if not (model / "jedi_model.json").exists():
        print(f"error: no model at {model} (train JeDi-mini first, or pass --model DIR)", file=sys.stderr)
        return None
    return model


def cli_list(parser: argparse.ArgumentParser, flag: str, text: str, cast=float) -> tuple:
    """'1,2.5' -> (1.0, 2.5); a bad or empty list is a parser error naming the flag."""
    try:
        values = tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"{flag} {text!r}: expected a comma-separated list of {cast.__name__}")
    if not values:
        parser.error(f"{flag} is empty")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", default="out/minibench")
    p.add_argument("--subjects", type=int, default=None, help="test subjects (default 16; quick 2)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 2; quick 1)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts per subject (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; quick 5)")
    p.add_argument("--guidance-scale", type=float, default=None, help="sT (default: the model's recommended, else 3)")
    p.add_argument("--image-guidance-scale", type=float, default=None,
                   help="sI (default: the model's recommended, else 2)")
    p.add_argument("--guidance-order", default=None, choices=ORDERS,
                   help="which guidance term conditions on the other (sampling/guidance.py; default: the model's)")
    p.add_argument("--dreambooth-steps", type=int, default=None, help="finetuning steps (default 400; quick 3)")
    p.add_argument("--dreambooth-lr", type=float, default=2e-4)
    p.add_argument("--dreambooth-subjects", type=int, default=None,
                   help="run DreamBooth on the first N subjects only (default 8; quick 2)")
    p.add_argument("--rows", default=",".join(ROW_NAMES), help="comma-separated subset of: " + ", ".join(ROW_NAMES))
    p.add_argument("--evaluators", default=None, help="folder of the evaluator weights (default: shipped)")
    p.add_argument("--quick", action="store_true", help="CI smoke mode: 2 subjects, 1 seed, 1 prompt, 5 steps")
    args = p.parse_args(argv)

    model = cli_model(args.model)
    if model is None:
        return 2
    settings = Settings.quick_mode() if args.quick else Settings()
    for field, value in (("subjects", args.subjects), ("seeds", args.seeds), ("prompts", args.prompts),
                         ("steps", args.steps), ("dreambooth_steps", args.dreambooth_steps),
                         ("dreambooth_subjects", args.dreambooth_subjects)):
        if value is not None:
            setattr(settings, field, value)
    settings.guidance_scale, settings.image_guidance_scale = args.guidance_scale, args.image_guidance_scale
    settings.guidance_order = args.guidance_order
    settings.dreambooth_lr = args.dreambooth_lr
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    bad = [r for r in rows if r not in ROW_NAMES]
    if bad:
        p.error(f"unknown rows {bad}; choose from {', '.join(ROW_NAMES)}")
    for need in ("ground_truth", "text_only"):  # the normalization's 0 and 1
        if need not in rows:
            rows = (need,) + rows
    settings.rows = rows
    run(model, args.out, settings, evaluators=args.evaluators)
    return 0


if __name__ == "__main__":
    sys.exit(main())
