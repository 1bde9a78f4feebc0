"""The main job on the embedded default: JeDi-mini personalizes held-out subjects into new contexts.

    python -m jedi_jax.demo [--out out/demo] [--steps 50] [--model DIR]     (or: make demo)

For each shipped example (3 renders of a mini-world TEST subject, never seen in training) it
generates the example's suggested prompts, contexts whose (background, placement) pairs training
never rendered, in one joint set with the 3 references, and writes out/demo/grid.png: per subject,
the references on top, the generated images below with their prompts as labels, and the ground-
truth render of each prompt for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jedi_jax.assets import DEFAULT_MODEL_DIR, EXAMPLES_DIR


def load_examples(folder: Path = EXAMPLES_DIR) -> list[dict]:
    examples = []
    for path in sorted(folder.glob("*/example.json")):
        info = json.loads(path.read_text())
        info["reference_files"] = [path.parent / r["file"] for r in info["references"]]
        examples.append(info)
    return examples


def ground_truth(example: dict, prompt: dict) -> np.ndarray:
    """The mini world's render of the subject in the prompt's context (uint8 (64, 64, 3))."""
    from jedi_jax.data import mini_world as mw

    image, _ = mw.render(mw.subject_from_name(example["subject"]), mw.Context(**prompt["context"]))
    return image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-prompts", type=int, default=3, help="prompts per subject (at most 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not (model / "jedi_model.json").exists():
        print(f"error: no model at {model}: the embedded JeDi-mini is missing from this installation "
              "(train it with: python -m jedi_jax.train --config configs/mini.py)", file=sys.stderr)
        return 2
    start = time.time()
    from jedi_jax.pipeline import JeDiPipeline
    from jedi_jax.sampling.images import labeled_grid

    pipe = JeDiPipeline.from_pretrained(model, max_references=3)
    print(f"loaded {model} in {time.time() - start:.1f} s")
    rows, labels = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for example in load_examples():
        prompts = example["prompts"][: args.num_prompts]
        result = pipe([q["prompt"] for q in prompts], example["reference_files"],
                      reference_prompts=[r["caption"] for r in example["references"]],
                      num_inference_steps=args.steps, seed=args.seed, progress=True)
        print(f"{example['subject']}: compiled in {result.seconds['compile']:.1f} s, "
              f"sampled {len(prompts)} images in {result.seconds['run']:.1f} s")
        refs = [np.asarray(r) for r in result.references]
        rows += [refs, [np.asarray(im) for im in result.images], [ground_truth(example, q) for q in prompts]]
        labels += [[f"{example['subject']} ref {i + 1}" for i in range(len(refs))],
                   [q["prompt"] for q in prompts], ["ground truth"] * len(prompts)]
        for i, image in enumerate(result.images):
            image.save(out / f"{example['subject']}_{i}.png")
    grid = labeled_grid(rows, labels, cell=128)
    grid.save(out / "grid.png")
    print(f"done in {time.time() - start:.1f} s: grid at {(out / 'grid.png').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
