"""The mini-world VAE trainer (jedi_jax/train/vae_trainer.py): one tiny seeded run (~20-30 s on a CPU)
checked for learning, export round trip and the latent scaling factor."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mini_vae  # noqa: E402
from jedi_jax.convert.pipeline_folder import load_component_params, read_model_index  # noqa: E402
from jedi_jax.models.functional import Functional  # noqa: E402
from jedi_jax.models.vae import sample_latent  # noqa: E402
from jedi_jax.train import vae_trainer as vt  # noqa: E402


def _tiny_config():
    c = mini_vae.get_config("tiny")
    c.data.pool_size = 8  # one fixed set of 8 renders: every batch is drawn from it
    c.data.batch_size = 8
    c.data.hflip = 0.0
    c.data.eval_renders = 8
    c.data.eval_batch = 8
    c.data.scale_renders = 8  # one batch: the scaling latents are fold_in(scale_key, 0) samples
    c.train.steps = 30
    c.train.lr = 3e-3
    c.checkpoint.every = 30
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae_run")
    config = _tiny_config()
    result = vt.train(config, workdir, log_fn=lambda s: None)
    return config, workdir, result


def test_loss_decreases_on_a_fixed_batch(tiny_run):
    config, _, result = tiny_run
    vae = Functional.abstract(vt.vae_factory(result["vae_config"]))
    x = vt.to_float(jnp.asarray(vt.make_renders("train", 8, set_size=config.data.set_size)))
    loss = jax.jit(lambda p: vt.vae_loss(vae, p, x, jax.random.key(7), config.train)[0])
    before = float(loss(vt.init_params(vae, config.seed)))
    after = float(loss(result["params"]))
    assert np.isfinite(before) and np.isfinite(after)
    print(f"fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.75 * before, (before, after)


def test_outputs_and_metrics(tiny_run):
    _, workdir, result = tiny_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [10, 20, 30]
    assert all(k in train_rows[0] for k in ("loss", "l1", "kl", "psnr", "steps_per_s", "lr"))
    assert rows[-1]["kind"] == "final" and rows[-1]["test_psnr"] == pytest.approx(result["test_psnr"])
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 30 and summary["scaling_factor"] == pytest.approx(result["scaling_factor"])
    assert (workdir / "reconstructions.png").stat().st_size > 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["30"]


def test_export_loads_back_and_reconstructs_the_same(tiny_run):
    config, workdir, result = tiny_run
    export = workdir / "vae_export"
    assert read_model_index(export) == {"vae": "vae"}
    vae_config, functional, params = load_component_params(export, "vae", "vae")
    assert vae_config == result["vae_config"]
    assert vae_config.sample_size == 64 and vae_config.downsample_factor == 4 and vae_config.latent_channels == 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    test = vt.make_renders("test", config.data.eval_renders, set_size=config.data.set_size)
    reconstruct = vt.make_reconstruct(functional)
    recon = vt.reconstruct_all(reconstruct, params, test, config.data.eval_batch)
    assert recon.shape == test.shape
    # the same reconstruction the trainer evaluated: its test PSNR is reproduced from the folder
    x = test.astype(np.float32) / 127.5 - 1.0
    psnr = float(np.mean(np.asarray(vt.psnr(jnp.asarray(x), jnp.asarray(recon)))))
    assert psnr == pytest.approx(result["test_psnr"], abs=1e-4)


def test_scaling_factor_is_one_over_latent_std(tiny_run):
    config, _, result = tiny_run
    vae = Functional.abstract(vt.vae_factory(result["vae_config"]))
    images = vt.make_renders("train", config.data.scale_renders, set_size=config.data.set_size)
    _, scale_key = vt.run_keys(config.seed)
    mean, logvar = jax.jit(lambda p, x: vae.bind(p).encode(vt.to_float(x)))(result["params"], images)
    assert mean.shape == (len(images), 16, 16, 4)  # 64x64x3 -> 16x16x4
    z = np.asarray(sample_latent(mean, logvar, jax.random.fold_in(scale_key, 0)), np.float64)
    expected = 1.0 / z.std()
    assert result["vae_config"].scaling_factor == pytest.approx(expected, rel=1e-5)
    assert result["scaling_factor"] == pytest.approx(expected, rel=1e-5)


def test_config_is_locked_and_variants_exist():
    for arg in ("cpu", "gpu", "tiny"):
        c = mini_vae.get_config(arg)
        vt.validate_config(c)
        assert len(c.model.block_out_channels) == 3  # 64 -> 16: 16x16x4 latents
        assert c.is_locked  # a variant's misspelled key fails where it is written
    with pytest.raises(ValueError):
        mini_vae.get_config("tpu")


def test_sigterm_saves_and_a_rerun_resumes_refusing_trajectory_changes(tmp_path):
    """SIGTERM mid-run saves the step reached and returns without exporting; re-running finishes and
    exports; a resume that changes the trajectory (train.lr) is refused naming the key, one that only
    lengthens a constant-lr run or changes its logging is not."""
    import signal

    from jedi_jax.train.trainer import ConfigChangeError

    def cfg(**train):
        c = _tiny_config()
        c.train.steps, c.train.warmup_steps, c.train.decay, c.train.log_every = 4, 0, "constant", 1
        c.checkpoint.every = 100  # only the pre-emption save and the last step's
        for k, v in train.items():
            c.train[k] = v
        return c

    def term_at_step_2(line):
        if line.startswith("step      2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    wd = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    out = vt.train(cfg(), wd, log_fn=term_at_step_2)
    assert out == {"status": "preempted", "step": 2}
    assert json.loads((wd / "summary.json").read_text()) == out  # launch/train_mini.sh stops on it
    assert signal.getsignal(signal.SIGTERM) == before and not (wd / "vae_export").exists()
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    lines = []
    out = vt.train(cfg(), wd, log_fn=lines.append)
    assert out["step"] == 4 and (wd / "vae_export").exists()
    assert json.loads((wd / "summary.json").read_text())["status"] == "done"
    assert any("step 2" in line and "resumed" in line for line in lines), lines
    with pytest.raises(ConfigChangeError, match=r"train\.lr \(0\.003 -> 0\.001\)"):
        vt.train(cfg(steps=6, lr=1e-3), wd, log_fn=lambda s: None)
    out = vt.train(cfg(steps=6, log_every=3), wd, log_fn=lambda s: None)  # longer, constant lr: the same run
    assert out["step"] == 6


@pytest.mark.parametrize("override,says", [
    ("--config.train.stepz=10", "error: --config.train.stepz: the config has no key 'stepz'"),
    ("--config.model.dtype=float16", "error: invalid config: model.dtype='float16' must be one of"),
])
def test_cli_refuses_a_bad_config_in_one_line_before_training(tmp_path, override, says):
    """The CLI locks the config: a misspelled override, or a value the trainer cannot run, is one
    `error:` line naming it (exit 2, no traceback), and nothing is trained or created."""
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "jedi_jax.train.vae_trainer", "--config", "configs/mini_vae.py:tiny",
                          "--workdir", str(tmp_path / "run"), override], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith(says) and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_one_run_per_workdir_and_a_failed_start_leaves_no_folder(tmp_path, monkeypatch):
    from jedi_jax.train.checkpoint import WorkdirError, WorkdirLock

    with WorkdirLock(tmp_path / "run"):
        with pytest.raises(WorkdirError, match=f"run is in use by another training run \\(pid {os.getpid()}"):
            vt.train(_tiny_config(), tmp_path / "run", log_fn=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # untouched

    def boom(*args, **kwargs):
        raise RuntimeError("boom while rendering")

    monkeypatch.setattr(vt, "make_renders", boom)
    with pytest.raises(RuntimeError, match="boom"):
        vt.train(_tiny_config(), tmp_path / "new" / "run", log_fn=lambda s: None)
    assert not (tmp_path / "new").exists()  # no empty run/checkpoints/ left behind


def test_ctrl_c_saves_the_step_reached(tmp_path):
    """A first Ctrl-C stops the VAE trainer like SIGTERM (checkpoint of the step reached, no export), and
    it says so."""
    import signal

    c = _tiny_config()
    c.train.steps, c.train.log_every, c.checkpoint.every = 3, 1, 100
    lines = []

    def interrupt_at_step_1(line):
        lines.append(line)
        if line.startswith("step      1/"):
            os.kill(os.getpid(), signal.SIGINT)

    class Aborted(Exception):  # raised by a stand-in for Python's handler (KeyboardInterrupt would end pytest)
        pass

    def abort(signum, frame):
        raise Aborted

    before = signal.signal(signal.SIGINT, abort)
    try:
        out = vt.train(c, tmp_path / "run", log_fn=interrupt_at_step_1)
        assert signal.getsignal(signal.SIGINT) is abort  # handed back
    finally:
        signal.signal(signal.SIGINT, before)
    assert out == {"status": "preempted", "step": 1}
    assert "interrupted: checkpoint of step 1 written; re-run the same command to resume" in lines
    assert not (tmp_path / "run" / "vae_export").exists()
