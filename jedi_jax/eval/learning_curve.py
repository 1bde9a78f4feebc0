r"""The learning curve of the real metric: normalized encoder identity of a run's checkpoints.

    python -m jedi_jax.eval.learning_curve --workdir runs/mini [--steps 1250,1500,2000] [--subjects 8] \
        [--first-subject 0] [--guidance-scale 3 --image-guidance-scale 2]

For each checkpoint (default: all in WORKDIR/checkpoints) the EMA UNet is evaluated with
`minibench.quick_identity` (k = 3 references, held-out prompts, 20 DDIM steps) inside ONE pipeline
(the sampler compiles once; only the UNet parameters change). Writes WORKDIR/identity_curve.json
and identity_curve.png (normalized identity and background/placement accuracy against steps, with
the training loss from metrics.jsonl on a second axis).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from jedi_jax.eval.cli import cli_at_least, cli_list, cli_scales


def checkpoint_unet(workdir: Path, step: int, allow_frozen_change: bool = False) -> dict:
    """The EMA UNet params of checkpoint `step`, through the exporter (strict, read-only restore)."""
    from jedi_jax.loading import load_component
    from jedi_jax.train.export import export_run

    with tempfile.TemporaryDirectory() as tmp:
        export_run(workdir, Path(tmp) / "m", step=step, log=lambda *_: None, allow_frozen_change=allow_frozen_change)
        return load_component(Path(tmp) / "m", "unet").params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.eval.learning_curve",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", default="", help="comma-separated checkpoint steps (default: all)")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--first-subject", type=int, default=0,
                   help="first test subject (0: MiniBench's, as the model card's curves; 100: validation subjects)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=3.0, help="text guidance sT")
    p.add_argument("--image-guidance-scale", type=float, default=2.0,
                   help="image guidance sI (2 = the shipped JeDi-mini's recommended)")
    p.add_argument("--allow-frozen-change", action="store_true",
                   help="score even when the rebuilt frozen VAE / text encoder differ from the run's (train.export)")
    args = p.parse_args(argv)
    cli_at_least(p, subjects=(args.subjects, 1), first_subject=(args.first_subject, 0),
                 sampling_steps=(args.sampling_steps, 1))
    cli_scales(p, guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale)
    wanted = cli_list(p, "--steps", args.steps, int) if args.steps.strip() else ()
    workdir = Path(args.workdir)
    if not (workdir / "checkpoints").is_dir():  # a typo would otherwise read as "no checkpoints yet"
        p.error(f"--workdir {workdir}: no checkpoints/ folder there (a training run's --workdir)")

    from jedi_jax.eval.minibench import quick_identity
    from jedi_jax.pipeline import JeDiPipeline
    from jedi_jax.train.checkpoint import Checkpointer
    from jedi_jax.train.export import export_run

    # read-only: the run may still be training, and a writer's manager would delete its in-flight save
    ck = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        available = ck.all_steps()
    finally:
        ck.close()
    missing = sorted(set(wanted) - set(available))
    if missing or not available:
        p.error(f"--workdir {workdir}: no checkpoint at step {', '.join(map(str, missing))} (has {available})"
                if missing else f"--workdir {workdir}: no checkpoints yet")
    steps = list(wanted) or available
    from jedi_jax.train.export import ExportError

    rows = []
    allow = args.allow_frozen_change
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = export_run(workdir, Path(tmp) / "latest", step=max(steps), log=lambda *_: None,
                              allow_frozen_change=allow)
        except ExportError as e:  # the run's frozen weights cannot be rebuilt here: one line
            print(f"error: {e}", file=sys.stderr)
            return 2
        pipe = JeDiPipeline.from_pretrained(base, max_references=3)
        for step in sorted(steps):
            params = checkpoint_unet(workdir, step, allow_frozen_change=allow)
            r = quick_identity(pipe, n_subjects=args.subjects, first_subject=args.first_subject,
                               steps=args.sampling_steps, unet_params=params,
                               guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale)
            rows.append(dict(step=step, **{k: float(v) for k, v in r.items() if np.isscalar(v)}))
            print(json.dumps(rows[-1]), flush=True)
    (workdir / "identity_curve.json").write_text(json.dumps(rows, indent=2))
    _plot(workdir, rows)
    print(f"wrote {workdir / 'identity_curve.json'} and identity_curve.png")
    return 0


def _plot(workdir: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["normalized"] for r in rows], "o-", label="normalized identity (k=3)")
    for key in ("background_acc", "placement_acc"):
        if key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], "s--", label=key.replace("_", " "))
    ax.set_xlabel("training step")
    ax.axhline(0, color="grey", lw=0.5)
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        train = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
        ax2 = ax.twinx()
        ax2.plot([t["step"] for t in train], [t["loss"] for t in train], color="grey", alpha=0.4, label="loss")
        ax2.set_ylabel("training loss")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / "identity_curve.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
