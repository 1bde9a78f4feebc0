"""`python -m jedi_jax.sample`: bad input is one line, exit code 2, no output; good input writes everything."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "jedi_jax.sample", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)).save(d / "ref.png")
    (d / "notimage.png").write_text("this is not an image")
    (d / "folder").mkdir()
    (d / "broken_model").mkdir()
    (d / "broken_model" / "jedi_model.json").write_text("{ not json")
    (d / "a_run" / "checkpoints" / "200").mkdir(parents=True)  # a training run's --workdir
    return d


BAD = {
    "missing file": (["--ref", "{d}/nope.png", "--prompt", "x"], "does not exist"),
    "not an image": (["--ref", "{d}/notimage.png", "--prompt", "x"], "not a readable image"),
    "a folder": (["--ref", "{d}/folder", "--prompt", "x"], "not a file"),
    "zero prompts": (["--ref", "{d}/ref.png"], "no --prompt"),
    "too many references": (["--ref", "{d}/ref.png"] * 3 + ["--prompt", "x", "--max-references", "2"], "at most 2"),
    "steps < 1": (["--prompt", "x", "--steps", "0"], "--steps 0 must be >= 1"),
    "negative guidance": (["--prompt", "x", "--guidance", "-1"], "must be finite and >= 0"),
    "negative image guidance": (["--prompt", "x", "--image-guidance", "-0.5"], "must be finite and >= 0"),
    "NaN guidance": (["--prompt", "x", "--guidance", "nan"], "must be finite and >= 0"),
    "infinite eta": (["--prompt", "x", "--eta", "inf"], "--eta inf must be in [0, 1]"),
    "eta above 1": (["--prompt", "x", "--eta", "1.5"], "--eta 1.5 must be in [0, 1]"),
    "negative seed": (["--prompt", "x", "--seed", "-1"], "--seed -1 must be in [0, 2**64)"),
    "output under a file": (["--prompt", "x", "--out", "{d}/ref.png/out"], "ref.png is a file"),
    "bad interval": (["--prompt", "x", "--image-guidance-interval", "0.5"], "expected START:END"),
    "empty interval": (["--prompt", "x", "--image-guidance-interval", "0.8:0.2"], "need 0 <= START < END <= 1"),
    "reference start out of range": (["--prompt", "x", "--reference-start", "1"], "need 0 <= FRACTION < 1"),
    "missing model": (["--prompt", "x", "--model", "{d}/no_model"], "does not exist"),
    "model index not JSON": (["--prompt", "x", "--model", "{d}/broken_model"], "not a readable JSON file"),
    "training run as model": (["--prompt", "x", "--model", "{d}/a_run"], "a_run is a training run (it has "
                              "checkpoints/), not a model folder (no jedi_model.json); export it first: python -m "
                              "jedi_jax.train.export --workdir {d}/a_run --dst DIR"),
    "folder that is no model": (["--prompt", "x", "--model", "{d}/folder"], "folder is not a jedi_jax model folder "
                                "(no jedi_model.json); convert a diffusers folder first: python -m jedi_jax.convert"),
    "eta with dpmpp_2m": (["--prompt", "x", "--sampler", "dpmpp_2m", "--eta", "0.5"], "dpmpp_2m is deterministic"),
    "steps beyond the schedule": (["--prompt", "x", "--steps", "1001"], "cannot exceed num_train_timesteps=1000"),
    "composed prompt, text_first": (["--prompt", "x AND y", "--guidance-order", "text_first", "--steps", "1"],
                                    "not composed prompts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_no_output(files, tmp_path, case):
    args, message = BAD[case]
    message = message.format(d=files)
    out = tmp_path / "out"
    r = _run(*[a.format(d=files) for a in args], *([] if "--out" in args else ["--out", out]))
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not out.exists()


def test_cli_writes_images_grid_and_settings(files, tmp_path, tiny_model_dir):
    import os

    out, cache = tmp_path / "out", tmp_path / "xla"
    r = _run("--ref", files / "ref.png", "--prompt", "a photo of the dog on the beach", "--num", "2", "--steps", "2",
             "--seed", "3", "--model", tiny_model_dir, "--max-references", "2", "--image-guidance-interval", "0.5:1",
             "--guidance-order", "text_first", "--out", out, env=dict(os.environ, JEDI_JAX_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr
    # no progress bar off a terminal, so the sampler itself went into the persistent cache (JAX refuses
    # programs with host callbacks; before, only small helper programs were cached)
    assert any(p.name.startswith("jit__generate") for p in cache.iterdir()), sorted(p.name for p in cache.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "image_00.png", "image_01.png", "settings.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seed"] == 3 and settings["steps"] == 2 and settings["num_references"] == 1
    assert settings["image_guidance_interval"] == [0.5, 1.0] and settings["guidance_order"] == "text_first"
    assert settings["set_size"] == 4 and settings["prompts"] == ["a photo of the dog on the beach"] * 2
    assert settings["dtype"] == "float32" and settings["reference_masks"] == [None]
    assert settings["truncated_prompts"] == []
    assert "compiled in" in r.stdout
    # the existing output folder is now refused
    r2 = _run("--prompt", "x", "--model", tiny_model_dir, "--out", out)
    assert r2.returncode == 2 and "already exists" in r2.stderr
