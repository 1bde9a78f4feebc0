"""Sampling cost of personalization vs plain text-to-image, one run, same model and steps.

    python -m jedi_jax.bench.sample_speed [--model DIR] [--steps 20] [--repeats 3]

Plain text-to-image: a set of m=1 target, no references, text guidance only (2 branches).
Personalization:     m=1 target with k=3 references (set of 4), image + text guidance (3 branches).
Prints seconds per generated image for each (compile excluded, mean of --repeats runs) and, as
the last line, their ratio. Default model: the embedded JeDi-mini if present, else a tiny random
SD-layout model at 64 px built on the fly.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from jedi_jax.assets import DEFAULT_MODEL_DIR, EXAMPLES_DIR
from jedi_jax.pipeline import JeDiPipeline


def _time(pipe, refs, steps, repeats) -> float:
    pipe(["a photo of the ball on the beach"], refs, num_inference_steps=steps, seed=0)  # compile + warm up
    runs = []
    for r in range(repeats):
        start = time.perf_counter()
        pipe(["a photo of the ball on the beach"], refs, num_inference_steps=steps, seed=r + 1)
        runs.append(time.perf_counter() - start)
    return float(np.mean(runs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.bench.sample_speed",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and DEFAULT_MODEL_DIR.is_dir():
            model = DEFAULT_MODEL_DIR
        if model is None:
            from jedi_jax.models.tiny import tiny_configs, write_random_model

            model = write_random_model(f"{tmp}/tiny64", configs=tiny_configs(resolution=64),
                                       words=("a", "photo", "of", "the", "ball", "on", "beach"))
        plain = JeDiPipeline.from_pretrained(model, max_references=0)
        personal = JeDiPipeline.from_pretrained(model, max_references=3)
        size = personal.resolution
        rng = np.random.default_rng(0)
        refs = sorted(EXAMPLES_DIR.glob("*/*.png"))[:3] or [
            (rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(3)]
        print(f"model {model}, {size}px, {args.steps} steps, device {jax.devices()[0].device_kind}")
        t_plain = _time(plain, [], args.steps, args.repeats)
        print(f"text-to-image   (m=1, k=0, text guidance, set of 1):          {t_plain:.3f} s/image")
        t_pers = _time(personal, refs[:3], args.steps, args.repeats)
        print(f"personalization (m=1, k=3, image+text guidance, set of 4):    {t_pers:.3f} s/image")
        print(f"ratio personalization / text-to-image: {t_pers / t_plain:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
