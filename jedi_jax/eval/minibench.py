"""MiniBench: JeDi's personalization measured on the mini world, with baselines and ablations.

    python -m jedi_jax.eval.minibench [--model DIR] [--out DIR] [--subjects 16] [--seeds 2] [--steps 50] [--quick]

The task (JeDi, CVPR 2024, Sec. 5, transplanted to a world with exact ground truth): for each of
``--subjects`` TEST-split subjects (never seen in training), give the model k = 1 or 3 REFERENCE
renders of the subject in random training-like contexts with their captions as reference prompts,
and ask for ``--prompts`` prompted contexts whose (background, placement) pair training never
rendered (``mw.HELDOUT_COMBOS``), under ``--seeds`` seeds. Every row sees the same subjects,
references, prompts and initial noise (paired comparison). The ground truth of a prompt is the mini
world's render of the subject in exactly that context. The cases, paired seeds, generation and
scoring are ``protocol.py``'s, shared with the guidance sweep and the DreamBooth curve.

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
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from jedi_jax.data import mini_world as mw
from jedi_jax.eval import metrics as M
from jedi_jax.eval.cli import cli_at_least, cli_choices, cli_evaluators, cli_learning_rates, cli_model, cli_scales
from jedi_jax.eval.minibench_report import plot, report, write_grid
from jedi_jax.eval.protocol import (MINIBENCH_SUBJECTS, VALIDATION_FIRST_SUBJECT, Scorer, call_seed, generate,
                                    load_pipeline, make_case)
from jedi_jax.sampling.guidance import ORDERS

@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str
    meaning: str
    k: int = 3  # references shown
    image_scale: float | None = None  # None = the run's image_guidance_scale
    coupled: bool = True
    composed: bool = False  # prompt given as protocol.COMPOSED_PARTS joined by " AND " (pipeline: composed prompts)


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
        "background (protocol.COMPOSED_PARTS), each part guided on its own (composable guidance; one more UNet "
        "branch): does the model compose a held-out pair it cannot follow as one sentence?", 3, composed=True),
)
ROW_NAMES = tuple(r.name for r in ROWS)


@dataclasses.dataclass
class Settings:
    subjects: int = MINIBENCH_SUBJECTS
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
    context = contextlib.nullcontext()
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


# ---------------------------------------------------------------------------------- the benchmark


def run(model, out: str | Path, settings: Settings, *, evaluators: str | None = None, log=print) -> dict:
    """Runs MiniBench on `model` (a folder or a JeDiPipeline); writes the outputs to `out`; returns results.

    The outputs are written to a hidden folder beside `out` that replaces `out` whole at the end (an
    earlier MiniBench output, or an empty or new folder): a rerun leaves no stale grids, and a crash
    leaves the previous run's folder as it was."""
    from jedi_jax.convert.param_io import atomic_directory

    out = Path(out)
    with atomic_directory(out, overwrite=True, marker="results.json") as stage:
        results = _run_into(stage, model, settings, evaluators=evaluators, log=log)
    log(f"[minibench] wrote {out}/report.md, results.json, identity_vs_rows.png, grids/ "
        f"({results['seconds_total']:.0f} s)")
    return results


def _run_into(out: Path, model, settings: Settings, *, evaluators: str | None, log) -> dict:
    from jedi_jax.eval.dreambooth import DreamBooth
    from jedi_jax.pipeline import JeDiPipeline

    start = time.time()
    (out / "grids").mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if r.name in settings.rows]
    pipe = load_pipeline(model)
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
                subjects=subjects, subset_comparisons=subset_comparisons(per_subject, subjects, idx),
                ci=f"95% expanded-percentile bootstrap over subjects ({M.BOOTSTRAP_SAMPLES} resamples, paired "
                   f"across rows; none below {M.MIN_CI_SUBJECTS} subjects)")


# Baselines whose paired differences against every row are reported even when they ran on every
# subject: issue 5's JeDi-vs-DreamBooth claim is a paired comparison, not two overlapping intervals.
ALWAYS_PAIRED = ("dreambooth",)


def subset_comparisons(per_subject: dict, subjects: list[str], idx) -> dict:
    """For every row run on part of the subjects (DreamBooth: the first --dreambooth-subjects), every
    full row on THOSE subjects, and the paired per-subject difference (part row - full row):

    {part_row: {"subjects": [...], "against": {full_row: {"enc_ref_normalized", "context_ok",
    "enc_ref_difference", "context_ok_difference"}}}}. The table puts a part row next to full rows
    scored on more subjects; this is the like-for-like comparison (normalized on the same subjects)."""
    out = {}
    full = [r for r in per_subject if not np.isnan(per_subject[r]["enc_ref"]).any()]
    for part, scores in per_subject.items():
        ok = ~np.isnan(scores["enc_ref"])
        if not ok.any() or (ok.all() and part not in ALWAYS_PAIRED):
            continue
        against = {}
        for r in full:
            if r in ("ground_truth", "text_only", part):
                continue
            on = {k: np.where(ok, v, np.nan) for k, v in per_subject[r].items()}  # (S,) NaN off the subset
            entry = {"context_ok": M.mean_ci(on["context_ok"], idx),
                     "enc_ref_difference": M.mean_ci(scores["enc_ref"] - on["enc_ref"], idx),
                     "context_ok_difference": M.mean_ci(scores["context_ok"] - on["context_ok"], idx)}
            if "ground_truth" in per_subject and "text_only" in per_subject:
                entry["enc_ref_normalized"] = M.normalized_ci(on["enc_ref"], per_subject["text_only"]["enc_ref"],
                                                              per_subject["ground_truth"]["enc_ref"], idx)
            against[r] = entry
        out[part] = {"subjects": [s for s, o in zip(subjects, ok) if o], "against": against}
    return out


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
                   evaluators: str | None = None, first_subject: int = 0) -> dict:
    """The normalized encoder identity of JeDi (k references) on `n_subjects` test subjects from
    `first_subject` on (0: MiniBench's first subjects, as every curve in the model card; use
    protocol.VALIDATION_FIRST_SUBJECT when the curve will choose something), one held-out prompt
    each, one seed, `steps` DDIM steps -- for a training learning curve.

    model: a JeDiPipeline (reused: its compiled sampler is cached, so repeated calls do not
    recompile) or a model folder. unet_params: evaluate these UNet parameters instead of the
    pipeline's (e.g. the trainer's current EMA params; same structure), without reloading.
    Text-only generation (the 0 point) is rerun with the same parameters, since it moves with
    training too; so is the ground truth (the 1 point), which does not (scoring it is cheap).

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
        model = _QUICK_CACHE[key] = _QUICK_CACHE.get(key) or load_pipeline(model)
    pipe = model
    scorer = _QUICK_CACHE.get(("scorer", evaluators)) or Scorer(evaluators)
    _QUICK_CACHE[("scorer", evaluators)] = scorer
    cases = [make_case(i, 1) for i in range(first_subject, first_subject + n_subjects)]
    swap = unet_params_swapped(pipe, unet_params) if unet_params is not None else contextlib.nullcontext()
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
                subjects=[c["name"] for c in cases], seconds=time.time() - start)


# ---------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.minibench",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    cli_at_least(p, subjects=(args.subjects, 2), seeds=(args.seeds, 1), prompts=(args.prompts, 1),
                 steps=(args.steps, 1), dreambooth_steps=(args.dreambooth_steps, 1),
                 dreambooth_subjects=(args.dreambooth_subjects, 2))
    cli_scales(p, guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale)
    cli_learning_rates(p, "--dreambooth-lr", (args.dreambooth_lr,))
    if args.subjects is not None and args.subjects > VALIDATION_FIRST_SUBJECT:
        p.error(f"--subjects {args.subjects}: MiniBench's subjects would reach the validation subjects "
                f"({VALIDATION_FIRST_SUBJECT} on) that chose the guidance scales; use at most {VALIDATION_FIRST_SUBJECT}")

    from jedi_jax.convert.param_io import check_destination

    try:  # a bad --out costs nothing: checked before the model loads
        check_destination(args.out, overwrite=True, marker="results.json")
    except FileExistsError as e:
        p.error(f"--out {args.out}: {e}")
    cli_evaluators(p, args.evaluators)
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
    rows = cli_choices(p, "--rows", args.rows, ROW_NAMES)
    for need in ("ground_truth", "text_only"):  # the normalization's 0 and 1
        if need not in rows:
            rows = (need,) + rows
    settings.rows = rows
    run(model, args.out, settings, evaluators=args.evaluators)
    return 0


if __name__ == "__main__":
    sys.exit(main())
