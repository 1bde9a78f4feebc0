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
    p = argparse.ArgumentParser(prog="python -m jedi_jax.demo",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", default="out/demo", help="output folder; a previous run's folder there is replaced whole")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-prompts", type=int, default=3, help="prompts per subject (at most 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps} must be >= 1")
    if not 1 <= args.num_prompts <= 4:
        p.error(f"--num-prompts {args.num_prompts} must be in 1..4 (each example suggests 4 prompts)")
    if not 0 <= args.seed < 2**64:
        p.error(f"--seed {args.seed} must be in [0, 2**64)")

    from jedi_jax.convert.param_io import atomic_directory, check_destination

    try:  # a bad --out costs nothing: checked before the model loads (the old folder is replaced whole)
        check_destination(args.out, overwrite=True, marker="grid.png")
    except FileExistsError as e:
        print(f"error: --out {args.out}: {e}", file=sys.stderr)
        return 2
    from jedi_jax.convert.pipeline_folder import model_folder_problem

    model = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if (why := model_folder_problem(model)) is not None:
        why = (f"--model {why}" if args.model else
               f"no model at {model}: the embedded JeDi-mini is missing from this installation "
               "(train one in a repository checkout: bash launch/train_mini.sh gpu; then --model runs/jedi_mini)")
        print(f"error: {why}", file=sys.stderr)
        return 2
    start = time.time()
    from jedi_jax.convert.torch_naming import ConversionError
    from jedi_jax.pipeline import JeDiPipeline, PipelineInputError
    from jedi_jax.sample import use_compilation_cache
    from jedi_jax.sampling.images import ImageInputError, labeled_grid

    use_compilation_cache()  # a second `make demo` skips XLA's compile (no progress bar: see sample.py)
    try:
        pipe = JeDiPipeline.from_pretrained(model, max_references=3)
    except (ConversionError, PipelineInputError) as e:  # a broken or unfit --model folder: one line
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"loaded {model} in {time.time() - start:.1f} s")
    rows, labels, files = [], [], {}
    for example in load_examples():
        prompts = example["prompts"][: args.num_prompts]
        try:
            result = pipe([q["prompt"] for q in prompts], example["reference_files"],
                          reference_prompts=[r["caption"] for r in example["references"]],
                          num_inference_steps=args.steps, seed=args.seed)
        except (PipelineInputError, ImageInputError) as e:  # e.g. --steps beyond the model's schedule
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{example['subject']}: compiled in {result.seconds['compile']:.1f} s (0: reused in this process), "
              f"sampled {len(prompts)} images in {result.seconds['run']:.1f} s")
        refs = [np.asarray(r) for r in result.references]
        rows += [refs, [np.asarray(im) for im in result.images], [ground_truth(example, q) for q in prompts]]
        labels += [[f"{example['subject']} ref {i + 1}" for i in range(len(refs))],
                   [q["prompt"] for q in prompts], ["ground truth"] * len(prompts)]
        files.update({f"{example['subject']}_{i}.png": image for i, image in enumerate(result.images)})
    files["grid.png"] = labeled_grid(rows, labels, cell=128)
    out = Path(args.out)
    # the new results replace the old folder whole, or not at all (no mix of two runs' images)
    try:
        with atomic_directory(out, overwrite=True, marker="grid.png") as tmp:
            for name, image in files.items():
                image.save(tmp / name)
    except OSError as e:  # a full disk, a folder made unwritable meanwhile: one line, the old folder kept
        print(f"error: could not write {out}: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.time() - start:.1f} s: grid at {(out / 'grid.png').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
