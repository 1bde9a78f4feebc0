"""MiniBench's outputs: the per-case sample grid, the bar plot and the markdown report.

``minibench.run`` computes ``results`` (the same dict it writes as results.json); this file only
turns it into what a person looks at: ``grids/<case>.png`` (references on top, one labelled row per
prompt), ``identity_vs_rows.png`` (identity and prompt fidelity per row, with 95% CIs) and
``report.md`` (tables, the rows' meanings, metric definitions, evaluators, timings, settings).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jedi_jax.eval import metrics as M


def write_grid(path: Path, case: dict, samples: dict, rows: list) -> None:
    """References on top; then one row per prompt: each method's seed-0 image, labelled."""
    from jedi_jax.sampling.images import labeled_grid

    grid_rows = [list(case["ref_images"])]
    labels = [[f"ref {i + 1}: {c}" for i, c in enumerate(case["ref_captions"])]]
    present = [r for r in rows if r.name in samples]
    for p, prompt in enumerate(case["prompts"]):
        grid_rows.append([samples[r.name][p] for r in present])
        labels.append([f"{r.label}" + (f" | {prompt['prompt']}" if r.name == "ground_truth" else "") for r in present])
    labeled_grid(grid_rows, labels, cell=96).save(path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"])
    labels = [results["row_info"][r]["label"] for r in rows]
    panels = [("enc_ref_normalized", "identity (encoder), normalized"),
              ("pix_normalized", "identity (pixels), normalized"),
              ("background_ok", "background accuracy"), ("placement_ok", "placement accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    for ax, (key, title) in zip(axes, panels):
        stats = [results["rows"][r].get(key) or {} for r in rows]
        mean = np.array([s.get("mean") if s.get("mean") is not None else np.nan for s in stats], float)
        lo = np.array([s.get("lo") if s.get("lo") is not None else np.nan for s in stats], float)
        hi = np.array([s.get("hi") if s.get("hi") is not None else np.nan for s in stats], float)
        err = np.nan_to_num(np.stack([mean - lo, hi - mean]).clip(0))
        colors = ["#4c72b0" if r.startswith("jedi") else "#999999" for r in rows]
        ax.barh(y, np.nan_to_num(mean), xerr=err, color=colors, capsize=3)
        ax.set_title(title, fontsize=10)
        ax.axvline(0, color="k", lw=0.5)
        if key.endswith("normalized"):
            ax.axvline(1, color="k", lw=0.5, ls="--")
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle("MiniBench (95% bootstrap CI over subjects)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict) -> str:
    s, t, rows = results["settings"], results["timings"], results["rows"]
    info = results["row_info"]
    f = M.fmt_ci
    lines = ["# MiniBench report", ""]
    if s.get("quick"):
        lines += ["**QUICK MODE** (CI smoke run): numbers are not meaningful.", ""]
    if s.get("model_source") and "random" in str(s["model_source"]):
        lines += [f"**Model has random weights** ({s['model_source']}): numbers are not meaningful.", ""]
    lines += [f"Model `{s['model']}` ({s['resolution']} px, max {s['max_references']} references). "
              f"{len(results['subjects'])} test subjects x {s['prompts']} prompts x {s['seeds']} seeds, "
              f"{s['steps']} {s['sampler']} steps, text guidance sT={s['guidance_scale']}, image guidance "
              f"sI={s['image_guidance_scale']}, guidance order {s.get('guidance_order') or 'image_first'} "
              f"(composed prompts: image_first). CIs: {results['ci']}.", "",
              "## Identity", "",
              "Normalized: 0 = text-only (k=0), 1 = ground-truth renders (per bootstrap resample).", "",
              "| row | encoder identity, normalized | encoder cos vs refs | encoder cos vs unseen gallery "
              "(normalized) | pixel identity, normalized | pixel identity (palette / texture) | subjects |",
              "|---|---|---|---|---|---|---|"]
    for r, e in rows.items():
        # the normalization's own 1 and 0 points: exact by construction, no interval to give
        g = (lambda stat, digits: _m(stat)) if r in ("ground_truth", "text_only") else f  # noqa: E731
        lines.append(f"| {info[r]['label']} | {g(e.get('enc_ref_normalized'), 2)} | {f(e['enc_ref'])} | "
                     f"{g(e.get('enc_gallery_normalized'), 2)} | {g(e.get('pix_normalized'), 2)} | {f(e['pix'])} "
                     f"({_m(e['palette'])} / {_m(e['texture'])}) | {e['enc_ref']['n']} |")
    lines += ["", "## Prompt fidelity (context classifier reads back the prompted labels)", "",
              "| row | background acc | placement acc | both | size acc | orientation acc | images | s / image |",
              "|---|---|---|---|---|---|---|---|"]
    for r, e in rows.items():
        spi = t.get(r, {}).get("seconds_per_image")
        both = e.get("context_ok")  # absent from results.json written before session 13
        lines.append(f"| {info[r]['label']} | {f(e['background_ok'], 2)} | {f(e['placement_ok'], 2)} | "
                     f"{'-' if both is None else f(both, 2)} | "
                     f"{f(e['size_ok'], 2)} | {f(e['orientation_ok'], 2)} | {e['images']} | "
                     f"{'-' if spi is None else f'{spi:.2f}'} |")
    lines += _placement_by_pair_table(results.get("placement_by_pair") or {}, info)
    lines += ["", "## Rows", ""] + [f"* **{info[r]['label']}** (`{r}`): {info[r]['meaning']}." for r in rows]
    diff = results.get("checks", {}).get("uncoupled_vs_text_only_max_abs_enc_diff")
    if diff is not None:
        lines += ["", f"Check: no-coupled-attention vs text-only, largest paired |difference| of encoder cosine = "
                  f"{diff:.2e} ({'identical up to float noise, as expected' if diff < 1e-3 else 'NOT identical: investigate'})."]
    db = t.get("dreambooth", {})
    if db.get("finetune_subjects"):
        lines += ["", f"DreamBooth: {s['dreambooth_steps']} steps, lr {s['dreambooth_lr']}, batch = the 3 references; "
                  f"run on the first {db['finetune_subjects']} of {len(results['subjects'])} subjects "
                  f"(its CIs are over those); finetuning took {db['finetune_minutes_per_subject']:.2f} wall minutes "
                  f"per subject (+ {db.get('finetune_compile', 0):.0f} s one-time compilation)"
                  + (f", vs JeDi's {t['jedi_k3']['seconds_per_image']:.2f} s per image."
                     if t.get("jedi_k3", {}).get("seconds_per_image") is not None else ".")]
    for part, comp in (results.get("subset_comparisons") or {}).items():
        n = len(comp["subjects"])
        on = "every one of the" if n == len(results.get("subjects") or []) else "its"
        lines += ["", f"### {info[part]['label']} against the full rows on {on} {n} subjects", "",
                  f"Like for like: every row normalized on the same {n} subjects; differences are paired per "
                  f"subject ({info[part]['label']} minus the row).", "",
                  "| row | encoder identity, normalized | both | encoder cos difference | both difference |",
                  "|---|---|---|---|---|",
                  f"| {info[part]['label']} | {f(rows[part].get('enc_ref_normalized'), 2)} | "
                  f"{f(rows[part].get('context_ok'), 2)} | - | - |"]
        for r, e in comp["against"].items():
            lines.append(f"| {info[r]['label']} | {f(e.get('enc_ref_normalized'), 2)} | {f(e['context_ok'], 2)} | "
                         f"{f(e['enc_ref_difference'], 3)} | {f(e['context_ok_difference'], 2)} |")
    lines += ["", "## Metrics", "",
              "* **encoder identity**: mean cosine similarity between the identity-encoder embeddings of the "
              "image and of the subject's 3 reference renders (the same 3 for every row; the copy row is "
              "therefore inflated). The *unseen gallery* column compares with 3 other renders of the subject "
              "that no row was shown instead.",
              "* **pixel identity** (model-free): (palette + texture) / 2, histogram intersections of 64-bin "
              "RGB and 8-bin gradient-magnitude histograms of the subject's pixels vs the references' foreground. "
              "Generated images have no mask: we use the ground-truth render's mask of the same prompted "
              "context (eroded 1 px), so a subject drawn in the wrong place/size also scores low.",
              "* **prompt fidelity**: the context classifier's background / placement (/ size / orientation) "
              "equal the prompt's. Its accuracy on ground truth is the ceiling. Background and placement are the "
              "prompt-fidelity metrics (the prompts' held-out pairs are exactly these two labels); *both* is the "
              "share of images with the two right at once, the composition the held-out pair asks for; size and "
              "orientation are shown for completeness only: the classifier reads orientation at ~2/3 on clean "
              "test renders (many shapes look alike tilted or upright).",
              "* **rows are paired**: every row sees the same subjects, references, prompts and initial noise "
              "(seed per subject/prompt/seed index), so differences between rows are not seed noise.",
              "", "## Evaluators (trained on train-split renders; validated on test-split subjects)", ""]
    for name, ev in results["evaluators"].items():
        lines.append(f"* `{name}`: validation {json.dumps(_round(ev['validation']))}; retrain: `{ev['retrain']}`")
    lines += ["", "## Timings", "", "| row | images | sampling s | compile s | wall s |", "|---|---|---|---|---|"]
    for r, d in t.items():
        lines.append(f"| {info[r]['label']} | {d.get('images', '-')} | {d.get('run', 0):.1f} | "
                     f"{d.get('compile', 0):.1f} | {d.get('wall', 0):.1f} |")
    lines += ["", f"Total: {results['seconds_total']:.0f} s.", "", "## Settings", "", "```",
              json.dumps({k: v for k, v in s.items()}, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def _placement_by_pair_table(by_pair: dict, info: dict) -> list[str]:
    """Placement accuracy per prompted held-out pair (rows as columns); misses and where they went."""
    rows = [r for r in by_pair if r != "ground_truth"]
    if not rows:
        return []
    pairs = sorted({p for r in rows for p in by_pair[r]["pairs"]})
    lines = ["", "### Placement by prompted (background, placement) pair", "",
             "Training rendered each background with the other 2 placements only, so a miss puts the subject "
             "where the model saw that background. Cell: accuracy (images); misses: the placement read instead.",
             "", "| pair | " + " | ".join(info[r]["label"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for pair in pairs:
        cells = []
        for r in rows:
            c = by_pair[r]["pairs"].get(pair)
            if c is None:
                cells.append("-")
                continue
            went = ", ".join(f"{k} {v}" for k, v in sorted(c["went"].items()))
            cells.append(f"{c['acc']:.2f} ({c['n']})" + (f"; misses: {went}" if went else ""))
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lent = [f"{info[r]['label']} {by_pair[r]['to_reference']} of {by_pair[r]['misses']} "
            f"(chance {by_pair[r]['to_reference_chance']:.1f})" for r in rows if by_pair[r]["misses"]]
    if lent:
        lines += ["", "Misses that went to a placement one of the row's references shows (chance: if a miss picked "
                  "either wrong placement at random): " + "; ".join(lent) + "."]
    def acc(cell):  # {"acc", "n"} or None -> "0.75 (16)" or "-"
        return "-" if cell is None else f"{cell['acc']:.2f} ({cell['n']})"

    by_bg = {r: by_pair[r].get("by_reference_background", {}) for r in rows}
    split = [f"{info[r]['label']} {acc(s.get('shown'))} / {acc(s.get('not shown'))}"
             for r, s in by_bg.items() if "shown" in s]
    if split:
        lines += ["", "Placement accuracy (images) when one of the row's references shows the prompted background "
                  "/ when none does: " + "; ".join(split) + "."]
    return lines


def _m(stat: dict) -> str:
    mean = None if not stat else stat.get("mean")
    return "n/a" if mean is None or not np.isfinite(mean) else f"{mean:.2f}"


def _round(x, digits: int = 3):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    return x
