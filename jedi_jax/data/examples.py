"""Packaged mini-world examples: 3 renders each of 3 TEST subjects (the demo's references), with
their captions and suggested prompts of contexts never seen in training (held-out
(background, placement) pairs).

Layout: ``jedi_jax/assets/examples/<subject_name>/ref_{0,1,2}.png`` + ``example.json``::

    {"subject": "test_mushroom_000003", "category": "mushroom",
     "references": [{"file": "ref_0.png", "caption": "...", "context": {Context fields}}, ...],
     "prompts": [{"prompt": "...", "context": {Context fields}, "heldout": true}, ...]}

Ground truth of a prompt: ``mini_world.render(subject_from_name(name), Context(**context))``.

    python -m jedi_jax.data.examples     # regenerate (after a mini-world change)
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
from PIL import Image

from jedi_jax.data import mini_world as mw

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                            "examples")
EXAMPLE_CATEGORIES = ("mushroom", "bottle", "star")
NUM_REFERENCES = 3
NUM_PROMPTS = 4


def _pick_subjects(categories=EXAMPLE_CATEGORIES) -> list[mw.Subject]:
    out, i = [], 0
    wanted = list(categories)
    while wanted:
        s = mw.subject_for("test", i)
        if s.category_name in wanted:
            wanted.remove(s.category_name)
            out.append(s)
        i += 1
    return out


def example_spec(subject: mw.Subject, k: int) -> dict[str, Any]:
    """References in training contexts (distinct backgrounds), prompts in held-out contexts."""
    rng = np.random.default_rng([29, k])
    refs, used = [], []
    for j in range(NUM_REFERENCES):
        ctx = mw.sample_context(rng, "train", exclude_backgrounds=used)
        # references show the subject clearly: large, upright except the last one
        ctx = mw.make_context(ctx.background, ctx.placement, size="large",
                              orientation=int(j == NUM_REFERENCES - 1), seed=ctx.bg_seed)
        used.append(ctx.background)
        refs.append({"file": f"ref_{j}.png", "caption": mw.caption(subject, ctx, rng),
                     "context": ctx.to_dict()})
    prompts = []
    combos = [mw.HELDOUT_COMBO_IDS[i] for i in rng.permutation(len(mw.HELDOUT_COMBO_IDS))]
    for j, (b, p) in enumerate(combos[:NUM_PROMPTS]):
        ctx = mw.make_context(b, p, size=j % 2, orientation=(j // 2) % 2, seed=1000 * k + j, jitter=False)
        prompts.append({"prompt": mw.prompt_for(subject.category, ctx), "context": ctx.to_dict(),
                        "heldout": True})
    return {"subject": subject.name, "category": subject.category_name, "references": refs,
            "prompts": prompts}


def write_examples(folder: str = EXAMPLES_DIR) -> list[str]:
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    names = []
    for k, subject in enumerate(_pick_subjects()):
        spec = example_spec(subject, k)
        d = os.path.join(folder, subject.name)
        os.makedirs(d)
        for ref in spec["references"]:
            img, _ = mw.render(subject, mw.Context(**ref["context"]))
            Image.fromarray(img).save(os.path.join(d, ref["file"]), optimize=True)
        with open(os.path.join(d, "example.json"), "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
        names.append(subject.name)
    return names


def load_examples(folder: str = EXAMPLES_DIR) -> list[dict[str, Any]]:
    """[{name, subject (Subject), category, images uint8 (3,64,64,3), captions, prompts}]"""
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "example.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            spec = json.load(f)
        images = np.stack([np.asarray(Image.open(os.path.join(folder, name, r["file"])).convert("RGB"))
                           for r in spec["references"]])
        out.append({"name": name, "subject": mw.subject_from_name(name), "category": spec["category"],
                    "images": images, "captions": [r["caption"] for r in spec["references"]],
                    "reference_contexts": [mw.Context(**r["context"]) for r in spec["references"]],
                    "prompts": spec["prompts"]})
    return out


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(prog="python -m jedi_jax.data.examples",
                            description=f"Regenerate the packaged examples in {EXAMPLES_DIR} "
                                        "(after a mini-world change); takes no arguments.").parse_args()
    print("wrote", write_examples())
