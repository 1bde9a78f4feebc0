"""Argument parsing shared by the evaluation CLIs: one clear parser error naming the flag for bad input."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def cli_model(arg: str | None) -> Path | None:
    """The eval CLIs' --model: a jedi_jax model folder, default the embedded JeDi-mini; None (after
    one error line on stderr) when there is no model there."""
    from jedi_jax.assets import DEFAULT_MODEL_DIR
    from jedi_jax.convert.pipeline_folder import model_folder_problem

    model = Path(arg) if arg else DEFAULT_MODEL_DIR
    problem = model_folder_problem(model)
    if problem is None:
        return model
    if not arg:  # the embedded default is missing: say how to get one
        problem = f"no model at {model} (train JeDi-mini first, or pass --model DIR)"
    print(f"error: {problem}", file=sys.stderr)
    return None


def cli_evaluators(parser: argparse.ArgumentParser, arg: str | None) -> None:
    """--evaluators: a folder holding both evaluators' weights (identity_encoder and
    context_classifier, .npz + .json), checked before the model loads; None = the shipped ones."""
    if arg is None:
        return
    from jedi_jax.eval import context_classifier, identity_encoder
    from jedi_jax.eval.cnn import weight_files

    if not Path(arg).is_dir():
        parser.error(f"--evaluators {arg}: no such folder")
    missing = [path.name for name in (identity_encoder.NAME, context_classifier.NAME)
               for path in weight_files(name, arg) if not path.is_file()]
    if missing:
        parser.error(f"--evaluators {arg}: lacks {', '.join(missing)} (train them with "
                     "python -m jedi_jax.eval.identity_encoder --train / jedi_jax.eval.context_classifier --train)")


def cli_at_least(parser: argparse.ArgumentParser, **counts: tuple[int | None, int]) -> None:
    """Each flag=(value, minimum): a value below its minimum is a parser error naming the flag
    (None = not given, left to the default). Flags are keyword names: subjects -> --subjects."""
    for name, (value, minimum) in counts.items():
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def cli_scales(parser: argparse.ArgumentParser, **values) -> None:
    """Each flag=value (a float, a tuple of floats, or None = not given): NaN, inf or a negative value
    is a parser error naming the flag (guidance scales and weights; before the model loads)."""
    for name, value in values.items():
        for v in (() if value is None else value if isinstance(value, tuple) else (value,)):
            if not (math.isfinite(v) and v >= 0):
                parser.error(f"--{name.replace('_', '-')} {v}: must be finite and >= 0")


def cli_learning_rates(parser: argparse.ArgumentParser, flag: str, values: tuple) -> None:
    """Learning rates must be finite and > 0 (NaN passes a plain `<= 0` test)."""
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        parser.error(f"{flag} {bad[0]}: learning rates must be finite and > 0")


def cli_list(parser: argparse.ArgumentParser, flag: str, text: str, cast=float) -> tuple:
    """'1,2.5' -> (1.0, 2.5); a bad or empty list is a parser error naming the flag."""
    try:
        values = tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"{flag} {text!r}: expected a comma-separated list of {cast.__name__}")
    if not values:
        parser.error(f"{flag} is empty")
    return values


def cli_choices(parser: argparse.ArgumentParser, flag: str, text: str, choices) -> tuple:
    """'a,b' -> ('a', 'b'), each one of choices; an unknown or empty list is a parser error naming the flag."""
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in choices]
    if bad or not values:
        parser.error(f"{flag}: {', '.join(bad) or 'empty'}; choose from {', '.join(choices)}")
    return values


def cli_intervals(parser: argparse.ArgumentParser, text: str) -> tuple:
    """'0:1,0.3:1' -> ((0.0, 1.0), (0.3, 1.0)); a bad interval is a parser error naming it."""
    from jedi_jax.sample import parse_interval

    try:
        intervals = tuple(parse_interval(x.strip(), "--image-intervals") for x in text.split(",") if x.strip())
    except ValueError as e:
        parser.error(str(e))
    if not intervals:
        parser.error("--image-intervals is empty")
    return intervals
