r"""Guidance sweep on VALIDATION subjects: choose JeDi's text and image guidance scales without
touching MiniBench's subjects.

    python -m jedi_jax.eval.guidance_sweep [--model DIR] [--out out/guidance_sweep] \
        [--first-subject 100] [--subjects 24] [--image-scales 1,2,3,4] [--text-scales 3,5] [--k 1,3] \
        [--placement-contrast 0,1,2 | --orders image_first,text_first] [--image-intervals 0:1,0.3:1] \
        [--reference-starts 0,0.2] [--reference-captions given,empty] [--sampler ddim] [--eta 0]

(A placement contrast above 0 composes prompts, which the text_first order does not take: the two
flags are refused together unless the contrasts are all 0 or the orders are image_first only.)

JeDi (CVPR 2024, Sec. 4.3) samples with two guidance scales: sT on the prompt, sI on the reference
images. They trade identity against prompt fidelity, so they must be picked on data the benchmark
does not score. MiniBench uses test-split subjects 0..S-1; this sweep uses test-split subjects
``first_subject .. first_subject + subjects - 1`` (disjoint for first_subject >= MiniBench's
--subjects), one held-out-pair prompt each, one seed, the same cases, paired noise and scorers as
MiniBench (``protocol.make_case`` / ``generate`` / ``Scorer``).

For every (sT, sI, k) it reports normalized encoder identity (0 = text-only at the same sT,
1 = ground truth), pixel identity and background / placement accuracy, each with a 95% bootstrap CI
over subjects, as a markdown table (OUT/report.md) and JSON (OUT/results.json). "both" is the share
of images with the prompted background AND the prompted placement: every prompt names a held-out
pair, so it measures composition, which neither accuracy alone does. The report also breaks the
normalized encoder identity down by subject category (each category normalized on its own subjects:
(mean - text-only) / (ground truth - text-only)) and, when several k are swept, gives the paired
difference of encoder cosine between consecutive k on the same subjects and noise, with its 95%
bootstrap CI (assets/jedi_mini/EXPERIMENTS.md, experiment 20).

``--placement-contrast w`` (w > 0) also says each prompt as a weighted composed prompt that adds
w x (the prompt - the same prompt at the other placements) to the text guidance
(``protocol.placement_contrast_prompt``): does guiding the placement word alone harder make a
held-out (background, placement) pair come out right?

``--image-intervals a:b`` applies sI only on the steps in [a, b) of the trajectory (0 = the noisiest
step) and 1 elsewhere (``pipeline.per_step_scales``): when do the references act? (On JeDi-mini,
identity forms in the second half, and no interval moves placement: assets/jedi_mini/EXPERIMENTS.md, experiment 5.)

``--orders image_first,text_first`` compares the two orders of the guidance terms
(``sampling/guidance.py``): the references' effect measured without the prompt (the paper's) or with it.

``--reference-starts r`` leaves the references out of the first fraction r of the steps, which are
then the text-only sampler's (``pipeline.reference_steps``): does the layout follow the prompt better
when the references join after it is set? (On JeDi-mini: placement up, background down;
assets/jedi_mini/EXPERIMENTS.md, experiment 16.)

``--reference-captions given,empty`` captions the references with their own captions (MiniBench's
protocol) or with "" (the pipeline's default when a user gives none): do a reference's words pull
the target toward its placement? (On JeDi-mini 3h: no, within two images of 48;
assets/jedi_mini/EXPERIMENTS.md, experiment 18.)

``--sampler`` / ``--eta`` run the whole grid with another sampler (``dpmpp_2m``) or with DDIM's
stochasticity eta (0 = deterministic DDIM, 1 = DDPM-like ancestral noise).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jedi_jax.eval import metrics as M
from jedi_jax.eval.cli import cli_at_least, cli_choices, cli_evaluators, cli_intervals, cli_list, cli_model, cli_scales
from jedi_jax.eval.protocol import (MINIBENCH_SUBJECTS, REFERENCE_CAPTIONS, VALIDATION_FIRST_SUBJECT, Scorer,
                                    call_seed, generate, load_pipeline, make_case, placement_contrast_prompt)
from jedi_jax.sampling.guidance import ORDERS
from jedi_jax.schedulers.schedule import SAMPLERS

SCORES = ("enc_ref", "pix", "background_ok", "placement_ok", "context_ok")


class Cell(NamedTuple):
    """One point of the grid: everything one generation of the validation cases depends on."""
    sT: float
    sI: float
    k: int
    contrast: float = 0.0  # placement-contrast weight w (0 = the plain prompt)
    interval: tuple[float, float] = (0.0, 1.0)  # part of the trajectory where sI applies (1 elsewhere)
    order: str | None = None  # guidance order (sampling/guidance.py); None = the folder's
    reference_start: float = 0.0  # fraction of the trajectory run without the references
    reference_captions: str = "given"  # protocol.REFERENCE_CAPTIONS

    def describe(self) -> str:
        a, b = self.interval
        return (f"sT={self.sT:g} sI={self.sI:g} k={self.k} contrast={self.contrast:g} interval={a:g}:{b:g} "
                f"order={self.order or 'default'} reference_start={self.reference_start:g} reference_captions={self.reference_captions}")


def grid(text_scales, image_scales, ks, contrasts, intervals, orders, reference_starts, reference_captions):
    """The cells, sT outermost (each sT's text-only baseline is generated before its cells)."""
    return [Cell(float(sT), float(sI), int(k), float(w), tuple(iv), order, float(r0), rc)
            for sT, sI, k, w, iv, order, r0, rc in itertools.product(
                text_scales, image_scales, ks, contrasts, intervals, orders, reference_starts, reference_captions)]


def sweep(model, *, first_subject: int = 100, subjects: int = 24, text_scales=(3.0,), image_scales=(2.0,),
          ks=(3,), contrasts=(0.0,), intervals=((0.0, 1.0),), orders=(None,), reference_starts=(0.0,),
          reference_captions=("given",), steps: int = 20,
          seed_index: int = 0, sampler: str = "ddim", eta: float = 0.0, evaluators: str | None = None,
          log=print) -> dict:
    """Runs the grid (one ``Cell`` per combination of the axes); returns {'rows': [{<Cell's fields>,
    <score>: ci, enc_ref_normalized: ci, pix_normalized: ci, seconds}], 'ground_truth': ..., ...}.
    contrasts: placement-contrast weights w (0 = the plain prompt); intervals: (start, end) parts of the
    trajectory where sI applies (1 elsewhere); orders: guidance orders (sampling/guidance.py; None = the
    model folder's); reference_starts: fractions of the trajectory run without the references
    (pipeline.reference_steps); reference_captions: "given" or "empty" (protocol.REFERENCE_CAPTIONS)."""
    start = time.time()
    pipe = load_pipeline(model)
    orders = tuple(dict.fromkeys(pipe.guidance_order(o) for o in orders))  # None -> the folder's
    if "text_first" in orders and any(contrasts):  # refuse before the first image, not midway
        raise ValueError("placement contrast > 0 composes prompts, which guidance order text_first does not take")
    scorer = Scorer(evaluators)
    cases = [make_case(first_subject + i, 1) for i in range(subjects)]
    names = [c["name"] for c in cases]
    categories = [c["subject"].category_name for c in cases]
    idx = M.bootstrap_indices(len(cases))

    def scored(case, image):
        rec = scorer.score(case, 0, image[None])[0]
        rec["subject"] = case["name"]
        return rec

    def run(cell: Cell) -> list[dict]:
        recs = []
        for case in cases:
            prompt = placement_contrast_prompt(case, 0, cell.contrast) if cell.contrast else None
            image, _ = generate(pipe, case, 0, call_seed(case["index"], 0, seed_index), cell.k, steps=steps,
                                guidance_scale=cell.sT, image_guidance_scale=cell.sI, sampler=sampler, eta=eta,
                                prompt=prompt, image_guidance_interval=cell.interval, guidance_order=cell.order,
                                reference_start=cell.reference_start, reference_captions=cell.reference_captions)
            recs.append(scored(case, image))
        return recs

    def means(recs, key):
        return M.subject_means(recs, key, names)

    gt = [scored(case, case["prompts"][0]["gt"]) for case in cases]
    text_only: dict[float, list[dict]] = {}
    rows = []
    for cell in grid(text_scales, image_scales, ks, contrasts, intervals, orders, reference_starts,
                     reference_captions):
        if cell.sT not in text_only:  # k = 0: sI has nothing to act on
            text_only[cell.sT] = run(Cell(cell.sT, 0.0, 0))
        t0 = time.time()
        recs = run(cell)
        row = cell._asdict()
        row["interval"] = list(cell.interval)
        row["seconds"] = round(time.time() - t0, 1)
        for key in SCORES:
            row[key] = M.mean_ci(means(recs, key), idx)
        for key in ("enc_ref", "pix"):
            row[f"{key}_normalized"] = M.normalized_ci(means(recs, key), means(text_only[cell.sT], key),
                                                       means(gt, key), idx)
        enc = means(recs, "enc_ref")  # (S,)
        row["enc_ref_by_subject"] = [None if x != x else float(x) for x in enc]  # NaN -> None (JSON)
        row["enc_ref_normalized_by_category"] = by_category(enc, means(text_only[cell.sT], "enc_ref"),
                                                            means(gt, "enc_ref"), categories)
        rows.append(row)
        log(f"[guidance_sweep] {cell.describe()}: identity {M.fmt_ci(row['enc_ref_normalized'], 2)}, "
            f"background {row['background_ok']['mean']:.2f}, placement {row['placement_ok']['mean']:.2f}, "
            f"both {row['context_ok']['mean']:.2f} ({row['seconds']:.0f} s)")
    ceiling = {key: M.mean_ci(means(gt, key), idx) for key in ("background_ok", "placement_ok", "context_ok")}
    return dict(rows=rows, ground_truth=ceiling, subjects=names, categories=categories,
                k_differences=k_differences(rows, idx), first_subject=first_subject, steps=steps,
                sampler=sampler, eta=float(eta), seconds_total=round(time.time() - start, 1),
                model=str(pipe.model.folder))


def by_category(row, zero, one, categories: list[str]) -> dict:
    """{category: normalized-identity CI on that category's subjects only}, in sorted order: each
    category is normalized by its own text-only and ground-truth means (a category whose subjects are
    easy to recognize from the caption alone has a higher 0 point)."""
    cats = np.asarray(categories)
    out = {}
    for cat in sorted(set(categories)):
        m = cats == cat
        out[cat] = M.normalized_ci(row[m], zero[m], one[m], M.bootstrap_indices(int(m.sum())))
    return out


def k_differences(rows: list[dict], idx: np.ndarray) -> list[dict]:
    """Paired differences of encoder cosine between rows that differ only in k, consecutive k
    (k=2 - k=1, k=3 - k=2): the same subjects, prompts and noise, so the difference is resampled
    per subject (does one more reference add identity?)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_settings(r).items()), []).append(r)
    out = []
    for same in groups.values():
        same = sorted(same, key=lambda r: r["k"])
        for a, b in zip(same, same[1:]):  # None (a subject the row lacks) -> NaN
            x = np.array(b["enc_ref_by_subject"], float) - np.array(a["enc_ref_by_subject"], float)
            out.append(dict(_settings(b), k_from=a["k"], k_to=b["k"], enc_ref_difference=M.mean_ci(x, idx)))
    return out


def _settings(row: dict) -> dict:
    """A row's Cell fields but k (JSON lists as tuples; fields an older results.json lacks at their default)."""
    out = {}
    for field in Cell._fields:
        if field != "k":
            v = row.get(field, Cell._field_defaults.get(field))
            out[field] = tuple(v) if isinstance(v, list) else v
    return out


def setting_label(row: dict, rows: list[dict]) -> str:
    """'sT=3 sI=2', plus every other Cell field (but k) that differs between the grid's rows, so that
    rows of a sweep over, e.g., intervals can be told apart."""
    every = [_settings(r) for r in rows]
    mine = _settings(row)
    fields = ["sT", "sI"] + [f for f in mine if f not in ("sT", "sI") and len({s[f] for s in every}) > 1]

    def fmt(v):
        return ":".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)

    return " ".join(f"{f}={fmt(mine[f])}" for f in fields)


def report(results: dict) -> str:
    f = M.fmt_ci
    gt = results["ground_truth"]
    n = len(results["subjects"])
    first = results["first_subject"]
    lines = ["# Guidance sweep (validation subjects)", "",
             f"Test-split subjects {first}..{first + n - 1} (MiniBench scores subjects from 0 up), one held-out "
             f"(background, placement) prompt each, one seed, {results['steps']} steps of "
             f"{results['sampler']} (eta {results['eta']:g}); model "
             f"`{results['model']}`. Identity is normalized per sT (0 = text-only at that sT, 1 = ground "
             f"truth). Ground truth's background / placement / both accuracy: "
             f"{gt['background_ok']['mean']:.2f} / {gt['placement_ok']['mean']:.2f} / "
             f"{gt['context_ok']['mean']:.2f}.", "",
             "| sT | sI | sI interval | guidance order | references from | reference captions | k | "
             "placement contrast w | encoder identity, normalized | pixel identity, normalized | background acc | "
             "placement acc | both |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        iv = r["interval"]
        lines.append(f"| {r['sT']:g} | {r['sI']:g} | {iv[0]:g}:{iv[1]:g} | {r.get('order', 'image_first')} | "
                     f"{r.get('reference_start', 0.0):g} | {r.get('reference_captions', 'given')} | {r['k']} | "
                     f"{r['contrast']:g} | {f(r['enc_ref_normalized'], 2)} | "
                     f"{f(r['pix_normalized'], 2)} | {f(r['background_ok'], 2)} | {f(r['placement_ok'], 2)} | "
                     f"{f(r['context_ok'], 2)} |")
    cats = sorted(set(results.get("categories", [])))
    if cats and all("enc_ref_normalized_by_category" in r for r in results["rows"]):
        counts = {c: results["categories"].count(c) for c in cats}
        lines += ["", "Encoder identity by category, normalized on each category's own subjects "
                  "((mean - text-only) / (ground truth - text-only)). A category holds few subjects: its CI "
                  f"(results.json) is wide, and below {M.MIN_CI_SUBJECTS} subjects there is none; read differences "
                  "between categories with that in mind.", "",
                  "| setting | k | " + " | ".join(f"{c} ({counts[c]})" for c in cats) + f" | all ({n}) |",
                  "|---|---|" + "---|" * (len(cats) + 1)]
        for r in results["rows"]:
            per = r["enc_ref_normalized_by_category"]
            cells = [f"{per[c]['mean']:.2f}" if per[c]["mean"] is not None and np.isfinite(per[c]["mean"]) else "n/a"
                     for c in cats]
            lines.append(f"| {setting_label(r, results['rows'])} | {r['k']} | " + " | ".join(cells) +
                         f" | {r['enc_ref_normalized']['mean']:.2f} |")
    if results.get("k_differences"):
        lines += ["", "Paired difference of encoder cosine (raw, not normalized) between consecutive k, same "
                  "subjects and noise, 95% bootstrap CI over subjects:", ""]
        for d in results["k_differences"]:
            lines.append(f"- {setting_label(d, results['rows'])}: k={d['k_to']} - k={d['k_from']}: "
                         f"{f(d['enc_ref_difference'], 3)}")
    lines += ["", f"{results['seconds_total']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.guidance_sweep",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", default="out/guidance_sweep")
    p.add_argument("--first-subject", type=int, default=VALIDATION_FIRST_SUBJECT,
                   help="first test-split subject index (MiniBench uses 0..subjects-1: stay above it)")
    p.add_argument("--subjects", type=int, default=24,
                   help="validation subjects (12 proved too few to tell two UNets apart: "
                        "assets/jedi_mini/EXPERIMENTS.md)")
    p.add_argument("--text-scales", default="3", help="comma-separated sT values")
    p.add_argument("--image-scales", default="1,2,3,4", help="comma-separated sI values")
    p.add_argument("--k", default="1,3", help="comma-separated reference counts (1..3)")
    p.add_argument("--placement-contrast", default="0",
                   help="comma-separated weights w: 0 = the plain prompt; w > 0 = prompt :1+w AND the same prompt "
                        "at each other placement :-w/2")
    p.add_argument("--image-intervals", default="0:1",
                   help="comma-separated start:end parts of the trajectory (0 = noisiest step) where sI applies; "
                        "1 elsewhere")
    p.add_argument("--orders", default=None,
                   help="comma-separated guidance orders (image_first, text_first; sampling/guidance.py); "
                        "default: the model folder's")
    p.add_argument("--reference-starts", default="0",
                   help="comma-separated fractions of the trajectory (0 = noisiest step) run without the references")
    p.add_argument("--reference-captions", default="given",
                   help=f"comma-separated ways to caption the references: {', '.join(REFERENCE_CAPTIONS)} "
                        "(their own captions, or '' as the pipeline's default)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--evaluators", default=None)
    args = p.parse_args(argv)

    cli_evaluators(p, args.evaluators)

    model = cli_model(args.model)
    if model is None:
        return 2
    text_scales = cli_list(p, "--text-scales", args.text_scales)
    image_scales = cli_list(p, "--image-scales", args.image_scales)
    ks = cli_list(p, "--k", args.k, int)
    contrasts = cli_list(p, "--placement-contrast", args.placement_contrast)
    reference_starts = cli_list(p, "--reference-starts", args.reference_starts)
    if any(not 0 <= r < 1 for r in reference_starts):
        p.error("--reference-starts: each fraction must be in [0, 1)")
    if any(k < 1 or k > 3 for k in ks):
        p.error(f"--k {args.k}: each k must be in 1..3")
    cli_scales(p, text_scales=text_scales, image_scales=image_scales, placement_contrast=contrasts)
    intervals = cli_intervals(p, args.image_intervals)
    orders = (None,) if args.orders is None else cli_choices(p, "--orders", args.orders, ORDERS)
    if "text_first" in orders and any(contrasts):
        p.error("--placement-contrast > 0 composes prompts, which guidance order text_first does not take")
    reference_captions = cli_choices(p, "--reference-captions", args.reference_captions, REFERENCE_CAPTIONS)
    if not 0 <= args.eta <= 1:  # NaN fails too; the samplers take eta in [0, 1]
        p.error(f"--eta {args.eta}: must be in [0, 1]")
    cli_at_least(p, first_subject=(args.first_subject, 0), subjects=(args.subjects, 2), steps=(args.steps, 1))
    if args.first_subject < VALIDATION_FIRST_SUBJECT:  # MiniBench scores 0..subjects-1 (16 by default, up to 100)
        print(f"warning: --first-subject {args.first_subject} is below {VALIDATION_FIRST_SUBJECT}, among the subjects "
              f"MiniBench may score (0..{MINIBENCH_SUBJECTS - 1} by default, up to {VALIDATION_FIRST_SUBJECT - 1}): "
              f"scales chosen here would be tuned on the benchmark", file=sys.stderr)
    results = sweep(model, first_subject=args.first_subject, subjects=args.subjects, text_scales=text_scales,
                    image_scales=image_scales, ks=ks, contrasts=contrasts, intervals=intervals, orders=orders,
                    reference_starts=reference_starts, reference_captions=reference_captions, steps=args.steps,
                    sampler=args.sampler, eta=args.eta, evaluators=args.evaluators)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(report(results))
    print(report(results))
    print(f"[guidance_sweep] wrote {out}/report.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
