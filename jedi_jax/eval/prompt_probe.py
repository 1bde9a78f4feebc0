"""Prompt probe: does a model follow the caption's background and placement, and does it compose them?

    python -m jedi_jax.eval.prompt_probe [--model DIR] [--samples 16] [--templates full,4,6,7] [--steps 20]

MiniBench's prompt-fidelity columns mix two shifts: the (background, placement) pairs are held out
of training, and its prompts use the full wording (``mini_world.FULL_TEMPLATE``, which names every
label). This probe separates them: text-only generations (no references) of test subjects for each
caption template x {pairs seen in training, held-out pairs}, each read back by the context
classifier. A model that composes gets both labels right on held-out pairs; a model that memorized
pairs gets one label right and swaps the other for a seen partner. ``--ground-truth`` scores the
mini world's own renders of the same contexts instead (the ceiling; 1.0 up to the classifier).
Template ``place`` names the placement but no background (``data.pool.PLACEMENT_ONLY[0]``: the full
sentence cut after the placement): does the placement word alone move the subject? Its background
column is empty (nothing to follow) and "both" is its placement.

The text side is measured too (`text_sensitivity`): how the cross-attention context of the
background word moves when the placement word before it changes, when one extra word shifts it by
one position, and, for scale, when the background word itself changes. A context that moves more
under a one-word shift than under a different background is one a UNet cannot read by word.

Prints markdown tables and, with --out, writes them with the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jedi_jax.data import mini_world as mw
from jedi_jax.eval.cli import cli_at_least, cli_model, cli_scales

PAIRS = {"seen": mw.TRAIN_COMBOS, "held-out": mw.HELDOUT_COMBO_IDS}


def template_text(template: str) -> str:
    """'full' (MiniBench's), 'place' (placement, no background) or an index into mini_world.TEMPLATES."""
    if template == "full":
        return mw.FULL_TEMPLATE
    if template == "place":
        from jedi_jax.data.pool import PLACEMENT_ONLY
        return PLACEMENT_ONLY[0]
    if template.isdigit() and int(template) < len(mw.TEMPLATES):
        return mw.TEMPLATES[int(template)]
    raise ValueError(f"unknown template {template!r}: use 'full', 'place' or 0..{len(mw.TEMPLATES) - 1}")


def probe_cases(template: str, pairs: str, samples: int, seed: int = 0) -> list[dict]:
    """`samples` (prompt, labels, context, subject) cases of test subjects in `pairs` contexts."""
    rng = np.random.default_rng([seed, list(PAIRS).index(pairs)])
    combos = PAIRS[pairs]
    out = []
    for i in range(samples):
        subject = mw.subject_for("test", i)
        b, p = combos[int(rng.integers(len(combos)))]
        ctx = mw.make_context(b, p, size=int(rng.integers(2)), orientation=int(rng.integers(2)),
                              seed=int(rng.integers(2**31 - 1)), jitter=False)
        text = template_text(template)
        out.append(dict(prompt=mw.prompt_for(subject.category, ctx, text), background=b, placement=p,
                        context=ctx, subject=subject, seed=i))
    return out


def run_probe(pipe, classifier, *, templates=("full", "4", "6", "7"), samples: int = 16, steps: int = 20,
              guidance_scale: float = 3.0, ground_truth: bool = False, seed: int = 0) -> list[dict]:
    """Rows {'template', 'pairs', 'background_acc', 'placement_acc', 'both_acc', 'n'}; background_acc
    is None for a template that names no background; both_acc counts the labels the template names
    (background and/or placement), so for a template without a placement it is the background accuracy."""
    rows = []
    for template in templates:
        for pairs in PAIRS:
            cases = probe_cases(template, pairs, samples, seed)
            if ground_truth:
                images = np.stack([mw.render(c["subject"], c["context"])[0] for c in cases])
            else:
                images = np.stack([np.asarray(pipe([c["prompt"]], [], num_inference_steps=steps,
                                                   guidance_scale=guidance_scale, seed=c["seed"]).images[0])
                                   for c in cases])
            pred = classifier.predict(images)
            names_background = "{bg" in template_text(template)
            names_place = "{place" in template_text(template)
            ok_b = np.asarray(pred["background"]) == np.array([c["background"] for c in cases])
            ok_p = np.asarray(pred["placement"]) == np.array([c["placement"] for c in cases])
            # "both": every label the prompt names is read back (a placement it never named is not asked)
            both = (ok_b | (not names_background)) & (ok_p | (not names_place))  # (n,) bool
            rows.append(dict(template=template, wording=cases[0]["prompt"], pairs=pairs,
                             background_acc=float(ok_b.mean()) if names_background else None,
                             placement_acc=float(ok_p.mean()), both_acc=float(both.mean()), n=len(cases)))
    return rows


# Pairs of prompts that differ in one way; the background word ("desert") is compared across each pair.
SENSITIVITY_PROMPTS = {
    "placement word swapped (same position)": (
        "a photo of a large tilted star at the right of a desert scene",
        "a photo of a large tilted star at the center of a desert scene"),
    "shifted by one word (same words)": (
        "a photo of a large tilted star at the right of a desert scene",
        "a photo of a large star at the right of a desert scene"),
    "other background (same position; the scale of a real difference)": (
        "a photo of a large tilted star at the right of a desert scene",
        "a photo of a large tilted star at the right of a beach scene"),
}


def text_sensitivity(model, text_layer="last", word: str = "desert") -> list[dict]:
    """Cosine similarity of the context vector at the background word's token (`word`, or the
    word replacing it) for each prompt pair of SENSITIVITY_PROMPTS, under `model`'s text encoder at
    `text_layer` (what the UNet cross-attends to). Rows {'change', 'cosine', 'positions'}."""
    import jax.numpy as jnp

    from jedi_jax.models.clip_text import encode_prompts
    from jedi_jax.models.tokenizer import tokenize

    text = model.text_encoder
    length = int(text.config.max_position_embeddings)
    rows = []
    for change, pair in SENSITIVITY_PROMPTS.items():
        ids = tokenize(model.tokenizer, pair, length)  # (2, T)
        context = np.asarray(encode_prompts(text.functional.bind(text.params), jnp.asarray(ids), text_layer))
        positions = []
        for prompt, row in zip(pair, ids):
            words = prompt.split()
            target = word if word in words else words[pair[0].split().index(word)]
            (token,) = model.tokenizer(target, add_special_tokens=False)["input_ids"]
            positions.append(int(np.flatnonzero(row == token)[0]))
        a, b = context[0, positions[0]], context[1, positions[1]]
        rows.append(dict(change=change, cosine=float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                         positions=positions))
    return rows


def token_reading_rank(model) -> dict:
    """Could a trained text encoder give the UNet anything the frozen one cannot, at the "tokens" reading?

    At ``text_layer="tokens"`` every token id is one context vector wherever it stands (a bag of words,
    which determines every label of a mini-world caption: ``mini_world.parse_caption``). The UNet reads
    the context only through each cross-attention's bias-free ``to_k`` / ``to_v`` (SD layout, one pair
    per layer), so if the vectors of the V token ids a caption can hold are linearly independent, every
    table of per-word keys and values that a trained token embedding could produce is reachable by
    those maps already: training the encoder at this reading adds no capacity, only another path for
    the optimizer. Needs V <= width. Returns {'tokens': V, 'width': D, 'rank': r,
    'smallest_singular_value': s} over every word of ``mini_world.vocabulary()`` plus BOS/EOS/pad.
    """
    import jax.numpy as jnp

    from jedi_jax.models.clip_text import TOKEN_LAYER, encode_prompts

    tok = model.tokenizer
    ids = {int(i) for w in mw.vocabulary() for i in tok(w, add_special_tokens=False)["input_ids"]}
    ids |= {int(i) for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    text = model.text_encoder
    ordered = np.array(sorted(ids), np.int32)[None]  # (1, V): each id once, order irrelevant here
    vectors = np.asarray(encode_prompts(text.functional.bind(text.params), jnp.asarray(ordered), TOKEN_LAYER))[0]
    sv = np.linalg.svd(vectors.astype(np.float64), compute_uv=False)  # (min(V, D),)
    rank = int(np.sum(sv > sv[0] * max(vectors.shape) * np.finfo(np.float32).eps))
    return {"tokens": int(vectors.shape[0]), "width": int(vectors.shape[1]), "rank": rank,
            "smallest_singular_value": float(sv[-1])}


def sensitivity_table(rows: list[dict]) -> str:
    lines = ["| the background word's context when ... | cosine to the original | token positions |", "|---|---|---|"]
    lines += [f"| {r['change']} | {r['cosine']:.3f} | {r['positions'][0]}, {r['positions'][1]} |" for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| template | example prompt | pairs | background acc | placement acc | both |", "|---|---|---|---|---|---|"]
    for r in rows:
        bg = "-" if r["background_acc"] is None else f"{r['background_acc']:.2f}"
        lines.append(f"| {r['template']} | {r['wording']} | {r['pairs']} | {bg} | "
                     f"{r['placement_acc']:.2f} | {r['both_acc']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.prompt_probe",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--samples", type=int, default=16, help="prompts per (template, pairs) cell")
    p.add_argument("--templates", default="full,4,6,7",
                   help="'full' (MiniBench's wording), 'place' (placement only) and/or indices into "
                        "mini_world.TEMPLATES (4-7 name both background and placement; 0-3 omit the placement)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--ground-truth", action="store_true", help="score the world's renders (the ceiling)")
    p.add_argument("--out", default=None, help="write probe.md and probe.json here")
    args = p.parse_args(argv)
    cli_at_least(p, samples=(args.samples, 1), steps=(args.steps, 1))
    cli_scales(p, guidance_scale=args.guidance_scale)
    templates = [t.strip() for t in args.templates.split(",") if t.strip()]
    if not templates:
        p.error("--templates is empty")
    for t in templates:
        try:
            template_text(t)
        except ValueError as e:
            p.error(str(e))

    from jedi_jax.eval.context_classifier import load_context_classifier

    pipe = None
    if not args.ground_truth:
        from jedi_jax.pipeline import JeDiPipeline

        model = cli_model(args.model)
        if model is None:
            return 2
        pipe = JeDiPipeline.from_pretrained(model, max_references=0)
    rows = run_probe(pipe, load_context_classifier(), templates=templates, samples=args.samples, steps=args.steps,
                     guidance_scale=args.guidance_scale, ground_truth=args.ground_truth)
    text = table(rows)
    sensitivity, reach = [], None
    if pipe is not None:
        sensitivity = text_sensitivity(pipe.model, pipe.text_layer)
        text += "\n\nText side (" + f"text_layer={pipe.text_layer!r}" + "):\n\n" + sensitivity_table(sensitivity)
        if pipe.text_layer == "tokens":
            reach = token_reading_rank(pipe.model)
            text += (f"\n\nToken vectors of the {reach['tokens']} ids a caption can hold: rank {reach['rank']} of "
                     f"width {reach['width']} (smallest singular value {reach['smallest_singular_value']:.3f}); "
                     + ("independent, so a trained text encoder adds no capacity at this reading."
                        if reach["rank"] == reach["tokens"] else "dependent: some per-word key tables are out of reach."))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.md").write_text(text + "\n")
        (out / "probe.json").write_text(json.dumps(dict(rows=rows, text_sensitivity=sensitivity, token_reach=reach), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
