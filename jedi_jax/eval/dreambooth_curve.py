r"""Identity against wall time: how long DreamBooth-style finetuning needs to reach JeDi's identity.

    python -m jedi_jax.eval.dreambooth_curve [--model DIR] [--out out/dreambooth_curve] [--subjects 6] \
        [--lrs 5e-5,2e-4] [--budgets 25,50,100,200,400,800] [--prompts 2] [--steps 20]

JeDi's claim (CVPR 2024, Sec. 1 and 5.2) is identity comparable to test-time finetuning at a
fraction of its time. MiniBench times one DreamBooth budget; this measures the whole curve. For
each of MiniBench's first ``--subjects`` cases (or ``--first-subject 100`` on, validation
subjects MiniBench never scores, when the curve is to choose the baseline's learning rate; same references, prompts, paired seeds and scorers,
``protocol.make_case``) and each learning rate, ONE finetuning run of max(budgets) steps keeps the
UNet after every budget (``DreamBooth.finetune(snapshot_at=...)``); each snapshot generates the
prompts text-only, as MiniBench's DreamBooth row does. JeDi k=1 and k=3 generate the same prompts
with the same seeds.

Time axis: wall seconds on this machine to produce ONE personalized image: finetuning seconds
(compilation excluded) + one sampling call for DreamBooth; one sampling call for JeDi. The report
gives, per learning rate, the smallest budget whose mean normalized identity reaches JeDi k=3's
(if any) and the time ratio there. Outputs: OUT/report.md, OUT/results.json, OUT/identity_vs_time.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jedi_jax.eval import metrics as M
from jedi_jax.eval.cli import cli_at_least, cli_evaluators, cli_learning_rates, cli_list, cli_model, cli_scales
from jedi_jax.eval.protocol import VALIDATION_FIRST_SUBJECT, Scorer, call_seed, generate, load_pipeline, make_case

SCORES = ("enc_ref", "pix", "background_ok", "placement_ok")


def _summary(records: list[dict], zero: list[dict], one: list[dict], names: list[str], idx) -> dict:
    out = {key: M.mean_ci(M.subject_means(records, key, names), idx) for key in SCORES}
    for key in ("enc_ref", "pix"):
        out[f"{key}_normalized"] = M.normalized_ci(M.subject_means(records, key, names),
                                                   M.subject_means(zero, key, names),
                                                   M.subject_means(one, key, names), idx)
    return out


def measure(model, *, subjects: int = 6, lrs=(5e-5,), budgets=(50, 200), prompts: int = 2, seeds: int = 1,
            steps: int = 20, guidance_scale: float | None = None, image_guidance_scale: float | None = None,
            evaluators: str | None = None, first_subject: int = 0, log=print) -> dict:
    """Returns {'jedi': {k: summary + seconds_per_image}, 'dreambooth': [{lr, steps, finetune_seconds,
    seconds_per_image, ...summary}], 'reach': [...], settings}."""
    from jedi_jax.eval.dreambooth import DreamBooth, unet_params_swapped

    start = time.time()
    budgets = tuple(sorted(set(int(b) for b in budgets)))
    pipe = load_pipeline(model)
    guidance_scale, image_guidance_scale = pipe.guidance_scales(guidance_scale, image_guidance_scale)
    scorer = Scorer(evaluators)
    cases = [make_case(i, prompts) for i in range(first_subject, first_subject + subjects)]
    names = [c["name"] for c in cases]
    idx = M.bootstrap_indices(len(cases))
    keys = [(p, s) for p in range(prompts) for s in range(seeds)]

    def images_for(k: int, sink: list[dict], case) -> float:
        """Generates case's prompts with k references; scores into sink; returns run seconds."""
        run = 0.0
        for p, s in keys:
            image, sec = generate(pipe, case, p, call_seed(case["index"], p, s), k, steps=steps,
                                  guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale)
            run += sec["run"]
            rec = scorer.score(case, p, image[None])[0]
            rec["subject"] = case["name"]
            sink.append(rec)
        return run

    zero, one = [], []
    jedi = {1: [], 3: []}
    jedi_seconds = {1: 0.0, 3: 0.0}
    for case in cases:
        images_for(0, zero, case)
        for p, s in keys:
            rec = scorer.score(case, p, case["prompts"][p]["gt"][None])[0]
            rec["subject"] = case["name"]
            one.append(rec)
        for k in jedi:
            jedi_seconds[k] += images_for(k, jedi[k], case)
    n_images = len(cases) * len(keys)
    jedi_rows = {k: dict(_summary(jedi[k], zero, one, names, idx), seconds_per_image=jedi_seconds[k] / n_images)
                 for k in jedi}
    log(f"[dreambooth_curve] JeDi k=3 identity {M.fmt_ci(jedi_rows[3]['enc_ref_normalized'], 2)}, "
        f"{jedi_rows[3]['seconds_per_image']:.2f} s/image ({time.time() - start:.0f} s)")

    db_rows = []
    for lr in lrs:
        booth = DreamBooth(pipe, steps=max(budgets), lr=lr)
        recs = {b: [] for b in budgets}
        fin = {b: [] for b in budgets}
        sample_s = {b: 0.0 for b in budgets}
        for case in cases:
            t0 = time.time()
            _, info = booth.finetune(case["ref_images"], case["ref_captions"], seed=case["index"], snapshot_at=budgets)
            for b in budgets:
                fin[b].append(info["seconds_at"][b])
                with unet_params_swapped(pipe, info["snapshots"][b]):
                    sample_s[b] += images_for(0, recs[b], case)
            log(f"[dreambooth_curve] lr {lr:g} {case['name']}: {max(budgets)} steps in {info['seconds']:.0f} s "
                f"(+ sampling, {time.time() - t0:.0f} s in all)")
        for b in budgets:
            row = dict(lr=float(lr), steps=b, finetune_seconds=float(np.mean(fin[b])),
                       seconds_per_image=sample_s[b] / n_images, **_summary(recs[b], zero, one, names, idx))
            db_rows.append(row)
            log(f"[dreambooth_curve] lr {lr:g}, {b} steps ({row['finetune_seconds']:.1f} s): identity "
                f"{M.fmt_ci(row['enc_ref_normalized'], 2)}")
    results = dict(jedi=jedi_rows, dreambooth=db_rows, reach=reach(jedi_rows[3], db_rows), subjects=names,
                   settings=dict(subjects=subjects, first_subject=first_subject, lrs=list(lrs), budgets=list(budgets), prompts=prompts, seeds=seeds,
                                 steps=steps, guidance_scale=guidance_scale,
                                 image_guidance_scale=image_guidance_scale, model=str(pipe.model.folder)),
                   seconds_total=round(time.time() - start, 1))
    return results


def _identity(row: dict) -> float:
    mean = row["enc_ref_normalized"]["mean"]
    return -np.inf if mean is None else mean


def reach(jedi_row: dict, db_rows: list[dict]) -> list[dict]:
    """Per learning rate: the smallest budget whose mean normalized identity >= JeDi's, and the
    ratio of DreamBooth's time for one image (finetune + sample) to JeDi's (None if never reached)."""
    target = jedi_row["enc_ref_normalized"]["mean"]
    jedi_s = jedi_row["seconds_per_image"]
    out = []
    for lr in sorted({r["lr"] for r in db_rows}):
        rows = sorted((r for r in db_rows if r["lr"] == lr), key=lambda r: r["steps"])
        hit = next((r for r in rows if _identity(r) >= target), None)
        best = max(rows, key=_identity)
        out.append(dict(lr=lr, jedi_identity=target, best_identity=best["enc_ref_normalized"]["mean"],
                        best_steps=best["steps"], reached_at_steps=hit["steps"] if hit else None,
                        time_ratio=((hit["finetune_seconds"] + hit["seconds_per_image"]) / jedi_s) if hit else None,
                        max_time_ratio=(rows[-1]["finetune_seconds"] + rows[-1]["seconds_per_image"]) / jedi_s))
    return out


def _subject_range(settings: dict) -> str:
    """Which test subjects the curve ran on: MiniBench's (from 0) or validation ones (from 100)."""
    first = int(settings.get("first_subject", 0))  # results.json written before it was saved: 0
    last = first + settings["subjects"] - 1
    whose = "MiniBench subjects" if first < VALIDATION_FIRST_SUBJECT else "validation subjects"
    return f"{whose} {first}..{last}"


def report(results: dict) -> str:
    f = M.fmt_ci
    s = results["settings"]
    lines = ["# Identity vs wall time: JeDi against DreamBooth-style finetuning", "",
             f"{_subject_range(s)} (test split), {s['prompts']} held-out-pair prompts x "
             f"{s['seeds']} seed(s) each, {s['steps']} DDIM steps, sT={s['guidance_scale']:g}, "
             f"sI={s['image_guidance_scale']:g} (JeDi); DreamBooth finetunes on the 3 references, then generates "
             f"text-only. Identity normalized: 0 = text-only, 1 = ground truth; 95% bootstrap CIs over subjects. "
             f"Time: wall seconds on this machine for one personalized image (DreamBooth: finetuning, compilation "
             f"excluded, + one sampling call).", "",
             "| method | lr | finetune steps | s per image | encoder identity, normalized | pixel identity, normalized "
             "| background acc | placement acc |", "|---|---|---|---|---|---|---|---|"]
    for k, r in sorted(results["jedi"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| JeDi k={k} | - | 0 | {r['seconds_per_image']:.1f} | {f(r['enc_ref_normalized'], 2)} | "
                     f"{f(r['pix_normalized'], 2)} | {r['background_ok']['mean']:.2f} | "
                     f"{r['placement_ok']['mean']:.2f} |")
    for r in results["dreambooth"]:
        seconds = r["finetune_seconds"] + r["seconds_per_image"]
        lines.append(f"| DreamBooth k=3 | {r['lr']:g} | {r['steps']} | {seconds:.1f} "
                     f"| {f(r['enc_ref_normalized'], 2)} | {f(r['pix_normalized'], 2)} | "
                     f"{r['background_ok']['mean']:.2f} | {r['placement_ok']['mean']:.2f} |")
    lines += ["", "## Where DreamBooth reaches JeDi k=3", ""]
    for r in results["reach"]:
        if r["reached_at_steps"] is None:
            lines.append(f"* lr {r['lr']:g}: never reached JeDi's {r['jedi_identity']:.2f} within the budgets (best "
                         f"{r['best_identity']:.2f} at {r['best_steps']} steps; the longest budget costs "
                         f"{r['max_time_ratio']:.0f}x JeDi's time).")
        else:
            lines.append(f"* lr {r['lr']:g}: reached {r['jedi_identity']:.2f} at {r['reached_at_steps']} steps, "
                         f"{r['time_ratio']:.0f}x JeDi's time.")
    lines += ["", f"{results['seconds_total']:.0f} s in all. Plot: identity_vs_time.png."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for lr in sorted({r["lr"] for r in results["dreambooth"]}):
        rows = sorted((r for r in results["dreambooth"] if r["lr"] == lr), key=lambda r: r["steps"])
        x = [r["finetune_seconds"] + r["seconds_per_image"] for r in rows]
        y = [r["enc_ref_normalized"]["mean"] for r in rows]
        lo = [np.nan if r["enc_ref_normalized"]["lo"] is None else r["enc_ref_normalized"]["lo"] for r in rows]
        hi = [np.nan if r["enc_ref_normalized"]["hi"] is None else r["enc_ref_normalized"]["hi"] for r in rows]
        ax.plot(x, y, "o-", label=f"DreamBooth, lr {lr:g}")
        ax.fill_between(x, lo, hi, alpha=0.15)
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(str(r["steps"]), (xi, yi), fontsize=7, xytext=(2, 3), textcoords="offset points")
    for k, r in results["jedi"].items():
        e = r["enc_ref_normalized"]
        err = [[0.0], [0.0]] if e["lo"] is None else [[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]]
        ax.errorbar([r["seconds_per_image"]], [e["mean"]], yerr=err,
                    fmt="s", capsize=3, label=f"JeDi k={k}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= 2 * ax.get_xlim()[1]])
    ax.axhline(0, color="k", lw=0.5)
    ax.axhline(1, color="k", lw=0.5, ls="--")
    ax.set_xlabel("wall seconds for one personalized image (this machine)")
    ax.set_ylabel("identity (encoder), normalized")
    ax.set_title("JeDi vs DreamBooth-style finetuning (labels: finetune steps)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.dreambooth_curve",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", default="out/dreambooth_curve")
    p.add_argument("--subjects", type=int, default=6)
    p.add_argument("--first-subject", type=int, default=0,
                   help="first test subject (0: MiniBench's, whose DreamBooth row this times; "
                        f"{VALIDATION_FIRST_SUBJECT}: validation subjects, to choose a learning rate)")
    p.add_argument("--lrs", default="5e-5,2e-4", help="comma-separated DreamBooth learning rates")
    p.add_argument("--budgets", default="25,50,100,200,400,800", help="comma-separated finetuning step counts")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="JeDi's sT (default: the model's recommended)")
    p.add_argument("--image-guidance-scale", type=float, default=None,
                   help="JeDi's sI (default: the model's recommended)")
    p.add_argument("--evaluators", default=None)
    args = p.parse_args(argv)

    cli_evaluators(p, args.evaluators)

    model = cli_model(args.model)
    if model is None:
        return 2
    lrs = cli_list(p, "--lrs", args.lrs)
    budgets = cli_list(p, "--budgets", args.budgets, int)
    if min(budgets) < 1:
        p.error(f"--budgets {args.budgets}: each budget must be >= 1")
    cli_learning_rates(p, "--lrs", lrs)
    cli_scales(p, guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale)
    cli_at_least(p, subjects=(args.subjects, 2), first_subject=(args.first_subject, 0), prompts=(args.prompts, 1),
                 seeds=(args.seeds, 1), steps=(args.steps, 1))
    results = measure(model, subjects=args.subjects, first_subject=args.first_subject, lrs=lrs, budgets=budgets, prompts=args.prompts,
                      seeds=args.seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                      image_guidance_scale=args.image_guidance_scale, evaluators=args.evaluators)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "identity_vs_time.png")
    (out / "report.md").write_text(report(results))
    print(report(results))
    print(f"[dreambooth_curve] wrote {out}/report.md, results.json, identity_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
