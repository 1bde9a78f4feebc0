"""`python -m jedi_jax.demo` (what `make demo` runs): bad input is one line and exit 2, before any model
loads where the arguments alone show it; a run writes the grid and the images, replaces a previous run's folder whole, and fills JAX's
persistent compilation cache so the next `make demo` skips XLA's compile."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jedi_jax.demo import load_examples


def _demo(*args, cache=None, cwd=None):
    env = dict(os.environ, JEDI_JAX_CACHE=str(cache)) if cache else None
    return subprocess.run([sys.executable, "-m", "jedi_jax.demo", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--num-prompts", "5"], "--num-prompts 5 must be in 1..4"),
    (["--seed", "-3"], "--seed -3 must be in [0, 2**64)"),
    (["--model", "{tmp}/nowhere"], "the folder does not exist"),
    (["--model", "{tmp}"], "is not a jedi_jax model folder"),
    (["--model", "{tmp}/run"], "export it first: python -m jedi_jax.train.export --workdir"),
    (["--out", "{tmp}/a_file"], "exists and is not a folder"),
    (["--model", "{tmp}/broken"], "jedi_model.json: unsupported format"),  # found, but not loadable
    (["--steps", "1001"], "steps=1001: num_steps=1001 cannot exceed num_train_timesteps=1000"),  # after loading
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "jedi_model.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a training run's --workdir
    args = [a.format(tmp=tmp_path) for a in args]
    res = _demo(*args, *([] if "--out" in args else ["--out", tmp_path / "out"]))
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in err[-1], err
    assert not any("Traceback" in line for line in err), res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_demo_writes_the_grid_replaces_an_old_run_and_fills_the_compile_cache(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "xla_cache"
    out.mkdir()
    (out / "stale_from_an_older_run.png").write_text("old")
    # a folder that is not an earlier demo output (no grid.png) is refused whole, one line, untouched
    refused = _demo("--out", out, "--steps", "2", "--num-prompts", "1", cache=cache, cwd=tmp_path)
    assert refused.returncode == 2 and "has no grid.png" in refused.stderr, refused.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == ["stale_from_an_older_run.png"]
    (out / "grid.png").write_text("old")  # an earlier demo output: replaced whole
    res = _demo("--out", out, "--steps", "2", "--num-prompts", "1", cache=cache, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"grid at {out.resolve() / 'grid.png'}" in res.stdout.splitlines()[-1]
    examples = load_examples()
    assert len(examples) >= 2
    names = {f"{e['subject']}_0.png" for e in examples} | {"grid.png"}
    assert {p.name for p in out.iterdir()} == names  # the stale file went with the old folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo.")]  # no temporary folder left
    # per subject three rows (references, results, ground truth) of 128-px cells, plus labels
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] >= 3 * len(examples) * 128 and grid.shape[1] >= 3 * 128
    result = np.asarray(Image.open(out / f"{examples[0]['subject']}_0.png"))
    assert result.shape == (64, 64, 3) and result.std() > 5  # an image, not a constant
    # the sampler has no progress callback, so JAX may cache it on disk for the next run
    assert any(p.name.startswith("jit__generate") for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())
