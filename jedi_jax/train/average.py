r"""Weight averaging of model folders ("model soup", Wortsman et al., ICML 2022, uniform soup).

    python -m jedi_jax.train.average --models runs/jedi_a runs/jedi_b [--weights 0.5,0.5] \
        --dst runs/jedi_soup [--overwrite]

Two finetunes of the same start often sit in one basin of the loss, so their parameter average
is a model too, and can keep what each run gained. Only the UNet is averaged: JeDi trains the UNet
and freezes the rest, so every other component, the tokenizer and the scheduler must be the same
in every folder (checked to the byte; otherwise the average would mix models that read different
latents or text). The result is an ordinary model folder: it loads, samples and evaluates like an
export. Its "sampling" block is the first folder's (re-check the scales on validation).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from jedi_jax.convert import components as comp
from jedi_jax.convert.param_io import params_fingerprint
from jedi_jax.convert.pipeline_folder import (MODEL_FILE, load_component_params, read_model_index,
                                              read_sampling_defaults, write_model_folder)
from jedi_jax.convert.torch_naming import ConversionError

AVERAGED = "unet"  # the one trained component; everything else must be shared
COPIED_FOLDERS = ("tokenizer", "scheduler")


def _same_folder(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_folder(a / d, b / d) for d in cmp.common_dirs)


def parse_weights(text: str | None, n: int) -> list[float]:
    """'0.5,0.5' -> [0.5, 0.5]; None -> uniform. Weights must be >= 0, one per model, summing to 1."""
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {text!r}") from None
    return check_weights(weights, n)


def check_weights(weights: Sequence[float], n: int) -> list[float]:
    """The weights as a list, if they are one per model, >= 0 and sum to 1; else ValueError."""
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} values for {n} models")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:  # NaN too
        raise ValueError(f"--weights must be >= 0 and sum to 1, got {weights} (sum {sum(weights):g})")
    return weights


def average_folders(models: Sequence[str | Path], dst: str | Path, *, weights: Sequence[float] | None = None,
                    overwrite: bool = False, log=print) -> Path:
    """Writes to `dst` a model folder whose UNet is sum_i weights[i] * UNet_i (float32 arithmetic).

    Raises ConversionError, naming the folder and the component, if the folders are not
    finetunes of one model: other components, configs, tokenizer or scheduler differ.
    """
    models = [Path(m) for m in models]
    if len(models) < 2:
        raise ValueError(f"averaging needs at least 2 model folders, got {len(models)}")
    weights = check_weights(weights, len(models)) if weights is not None else [1.0 / len(models)] * len(models)
    kinds = read_model_index(models[0])
    if kinds.get(AVERAGED) != "unet":
        raise ConversionError(f"{models[0]}: no 'unet' component to average (has {sorted(kinds)})")
    first = models[0]
    for other in models[1:]:
        other_kinds = read_model_index(other)
        if other_kinds != kinds:
            raise ConversionError(f"{other}: components {other_kinds} differ from {first}'s {kinds}")
        for name in kinds:
            a, b = comp.read_config(first / name), comp.read_config(other / name)
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ConversionError(f"{other}: {name} config differs from {first}'s in {diff}")
        # which text layer the UNet was trained to read is a property of its weights, not a sampling
        # preference: UNets that read different layers are not finetunes of one model
        layers = [read_sampling_defaults(m).get("text_layer", "last") for m in (first, other)]
        if layers[0] != layers[1]:
            raise ConversionError(f"{other}: its UNet reads text layer {layers[1]!r}, {first}'s reads {layers[0]!r}")
        for folder in COPIED_FOLDERS:
            if (first / folder).is_dir() != (other / folder).is_dir() or (
                    (first / folder).is_dir() and not _same_folder(first / folder, other / folder)):
                raise ConversionError(f"{other}: {folder}/ differs from {first}'s")

    parts = {}
    for name, kind in kinds.items():
        if name == AVERAGED:
            continue
        config, _, params = load_component_params(first, name, kind)
        digest = params_fingerprint(params)
        for other in models[1:]:
            if params_fingerprint(load_component_params(other, name, kind)[2]) != digest:
                raise ConversionError(f"{other}: {name} parameters differ from {first}'s; only the UNet may differ")
        parts[name] = (kind, config, params)

    config, _, total = load_component_params(first, AVERAGED, "unet")
    total = jax.tree.map(lambda x: np.asarray(x, np.float32) * np.float32(weights[0]), total)
    for w, other in zip(weights[1:], models[1:]):
        params = load_component_params(other, AVERAGED, "unet")[2]
        total = jax.tree.map(lambda t, x: t + np.asarray(x, np.float32) * np.float32(w), total, params)
    parts[AVERAGED] = ("unet", config, total)

    source = "average of UNets " + " + ".join(f"{w:g} x {m}" for w, m in zip(weights, models))
    extra = {f: first / f for f in COPIED_FOLDERS if (first / f).is_dir()}
    sampling = json.loads((first / MODEL_FILE).read_text()).get("sampling")
    read_sampling_defaults(first)  # strict: refuse to copy a malformed block
    out = write_model_folder(dst, parts, extra_folders=extra, overwrite=overwrite, source=source, sampling=sampling)
    log(f"wrote {out}: {source}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jedi_jax.train.average",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="jedi_jax model folders, finetunes of one model")
    p.add_argument("--weights", default=None, help="comma-separated, summing to 1 (default: uniform)")
    p.add_argument("--dst", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        weights = parse_weights(args.weights, len(args.models))
        average_folders(args.models, args.dst, weights=weights, overwrite=args.overwrite)
    except (ConversionError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
