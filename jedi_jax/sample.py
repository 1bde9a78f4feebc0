r"""Personalize from the command line: references + prompts -> new images of the subject.

    python -m jedi_jax.sample --ref A.png --ref B.png --prompt "a photo of the ball on the beach" \
        --num 4 --steps 50 --seed 0 --out out/ball [--model DIR]

Writes OUT/image_00.png ..., OUT/grid.png (references on top, results below, prompts as labels)
and OUT/settings.json. --model defaults to the embedded JeDi-mini. Bad input (missing or unreadable
files, no prompt, too many references, steps < 1, negative guidance) is one line on stderr, exit
code 2 and no output folder: everything is written to a temporary folder renamed at the end.
JAX's persistent compilation cache lets a second run with the same shapes skip XLA's compile (the
cache lives in $JEDI_JAX_CACHE, by default ~/.cache/jedi_jax/xla). A progress bar is a host callback
inside the sampler, and JAX caches no program that has one: the bar is drawn only when stderr is a
terminal, and --no-progress turns it off there too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from jedi_jax.assets import DEFAULT_MODEL_DIR
from jedi_jax.convert.torch_naming import ConversionError
from jedi_jax.sampling.images import ImageInputError, load_reference

CACHE_DIR = Path(os.environ.get("JEDI_JAX_CACHE", Path.home() / ".cache" / "jedi_jax" / "xla"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(prog="python -m jedi_jax.sample", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", action="append", default=[], help="reference image (repeat for several)")
    p.add_argument("--ref-mask", action="append", default=None, help="subject mask per reference (optional)")
    p.add_argument("--ref-prompt", action="append", default=None, help="caption per reference (optional)")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt of an image to generate (repeat); parts joined by ' AND ' are composed, "
                        "each optionally weighted as 'part :w' (negative = away from it)")
    p.add_argument("--num", type=int, default=None, help="images to generate (repeats a single prompt)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None,
                   help="text guidance scale sT (default: the model's recommended, else 3)")
    p.add_argument("--image-guidance", type=float, default=None,
                   help="image guidance scale sI (default: the model's recommended, else 2)")
    p.add_argument("--image-guidance-interval", default=None, metavar="START:END",
                   help="apply sI only on this part of the trajectory (0 = noisiest step, 1 = end), 1 elsewhere")
    p.add_argument("--reference-start", type=float, default=0.0, metavar="FRACTION",
                   help="leave the references out of the first FRACTION of the steps (text-only there; "
                        "0 = references at every step)")
    p.add_argument("--guidance-order", default=None, choices=["image_first", "text_first"],
                   help="image_first: the references' effect measured without the prompt (the paper's); "
                        "text_first: with it (default: the model's, else image_first)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmpp_2m"])
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-references", type=int, default=3, help="references the compiled set can hold")
    p.add_argument("--free-known", action="store_true",
                   help="experiment: do not re-noise references each step; they are denoised with the targets "
                        "(sampling/joint.py JointSamplerConfig.replace_known)")
    p.add_argument("--model", default=None, help="jedi_jax model folder (default: the embedded JeDi-mini)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (the default off a terminal); lets the compiled sampler be cached")
    return p.parse_args(argv)


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache in CACHE_DIR, for every program however small."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def writable_folder_target(path: str | Path) -> str | None:
    """Why a new folder cannot be made at `path` (None if it can): it exists, or its nearest existing
    ancestor is not a writable directory. Checked before any model loads, so a bad --out costs nothing."""
    path = Path(path).absolute()
    if path.exists():
        return f"output folder {path} already exists"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def parse_interval(text: str, flag: str = "--image-guidance-interval") -> tuple[float, float]:
    """'0.3:1' -> (0.3, 1.0); raises ValueError with one line naming `flag`."""
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected START:END, e.g. 0.3:1") from None
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{flag} {text!r}: need 0 <= START < END <= 1")
    return start, end


def validate(args) -> None:
    """Checks everything cheap before any model is loaded; raises ValueError with one line."""
    if not args.prompt:
        raise ValueError("no --prompt given: give at least one prompt")
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num {args.num} must be >= 1")
    if args.num is not None and len(args.prompt) not in (1, args.num):
        raise ValueError(f"{len(args.prompt)} prompts for --num {args.num}: give 1 or {args.num}")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    if any(v is not None and not (v >= 0 and math.isfinite(v)) for v in (args.guidance, args.image_guidance)):
        raise ValueError(f"guidance scales must be finite and >= 0 (got --guidance {args.guidance}, "
                         f"--image-guidance {args.image_guidance})")
    if args.image_guidance_interval is not None:
        args.image_guidance_interval = parse_interval(args.image_guidance_interval)
    if not 0.0 <= args.reference_start < 1.0:
        raise ValueError(f"--reference-start {args.reference_start}: need 0 <= FRACTION < 1")
    if not 0 <= args.eta <= 1:  # NaN fails too
        raise ValueError(f"--eta {args.eta} must be in [0, 1] (1 = ancestral DDPM)")
    if args.sampler == "dpmpp_2m" and args.eta != 0:
        raise ValueError(f"--eta {args.eta}: dpmpp_2m is deterministic; eta applies to --sampler ddim only")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed {args.seed} must be in [0, 2**64)")
    if len(args.ref) > args.max_references:
        raise ValueError(f"{len(args.ref)} references given but the set holds at most {args.max_references} "
                         "(raise --max-references)")
    for flag, values in (("--ref-mask", args.ref_mask), ("--ref-prompt", args.ref_prompt)):
        if values is not None and len(values) != len(args.ref):
            raise ValueError(f"{len(values)} {flag} values for {len(args.ref)} references")
    for path in args.ref + (args.ref_mask or []):
        load_reference(path, 8)  # opens and decodes: missing / unreadable / not an image fail here
    problem = writable_folder_target(args.out)
    if problem:
        raise ValueError(problem)
    model = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not model.is_dir():
        raise ValueError(f"model folder {model} does not exist" if args.model else
                         "no embedded default model in this installation: pass --model DIR")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validate(args)
    except (ValueError, ImageInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax.numpy as jnp

    use_compilation_cache()

    from jedi_jax.convert.param_io import atomic_directory
    from jedi_jax.pipeline import JeDiPipeline, PipelineInputError

    start = time.time()
    try:
        pipe = JeDiPipeline.from_pretrained(args.model, max_references=args.max_references,
                                            dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    except (ConversionError, PipelineInputError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"loaded {pipe.model.folder} in {time.time() - start:.1f} s")
    try:
        out = pipe(args.prompt, args.ref, reference_masks=args.ref_mask, reference_prompts=args.ref_prompt,
                   num_images=args.num, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   image_guidance_scale=args.image_guidance, image_guidance_interval=args.image_guidance_interval,
                   guidance_order=args.guidance_order, reference_start=args.reference_start,
                   sampler=args.sampler, eta=args.eta, seed=args.seed,
                   replace_known=not args.free_known, progress=sys.stderr.isatty() and not args.no_progress)
    except (PipelineInputError, ImageInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"compiled in {out.seconds['compile']:.1f} s (lowering included; the persistent cache skips XLA's "
          f"part), sampled {len(out.images)} image(s) in {out.seconds['run']:.1f} s")
    try:
        with atomic_directory(args.out) as tmp:
            for i, image in enumerate(out.images):
                image.save(tmp / f"image_{i:02d}.png")
            out.grid.save(tmp / "grid.png")
            (tmp / "settings.json").write_text(json.dumps(
                dict(out.settings, references=args.ref, seconds=out.seconds),
                indent=2))
    except OSError as e:  # e.g. --out created by someone else meanwhile, or the disk filled up
        print(f"error: could not write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(out.images)} images and the grid to {Path(args.out) / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
