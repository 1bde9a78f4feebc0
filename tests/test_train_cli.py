"""`python -m jedi_jax.train` end to end on the :tiny config (random-weight tiny SD-layout networks on
the mini world), the sample grids (jedi_jax.train.hooks.sample_grid), and up-front config
validation (locked config, consistent sizes)."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from test_train_sharding import FAST_XLA, REPO

# Runs the module exactly as `python -m jedi_jax.train` does (runpy), after registering a stand-in
# for the sampler's hook module, which records its calls.
RUN_WITH_HOOK = r"""
import json, runpy, sys, types
from pathlib import Path
calls = []
def sample_grid(*, step, workdir, config, models, unet_params, frozen, batch, tokenizer, mesh):
    row = {"step": step, "batch": sorted(batch), "n_params": len(__import__("jax").tree.leaves(unet_params)),
           "frozen": sorted(frozen), "ids": tokenizer(["a ball on the beach"]).shape[1],
           "latent_channels": models.latent_channels}
    with open(Path(workdir) / "hook_calls.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return str(Path(workdir) / f"samples_{step}.png")
hooks = types.ModuleType("jedi_jax.train.hooks")
hooks.sample_grid = sample_grid
sys.modules["jedi_jax.train.hooks"] = hooks
sys.argv = ["jedi_jax.train"] + ARGS
runpy.run_module("jedi_jax.train", run_name="__main__", alter_sys=True)
"""


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_XLA}")


@pytest.mark.slow
def test_tiny_cli_end_to_end_with_sample_hook(tmp_path):
    wd = tmp_path / "run"
    args = ["--config", "configs/sd15.py:tiny", "--workdir", str(wd), "--config.train.steps=3",
            "--config.train.log_every=1", "--config.checkpoint.every=2", "--config.sample.every=2",
            "--config.train.subject_weight=2"]  # the loader then emits subject masks and the step reads them
    out = subprocess.run([sys.executable, "-c", RUN_WITH_HOOK.replace("ARGS", repr(args))], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    log = out.stdout + out.stderr
    assert "step 3/3 | loss" in log and "steps/s" in log and "img/s/chip" in log and "ETA" in log
    rows = [json.loads(r) for r in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.05 < r["loss"] < 10 and r["grad_norm"] > 0 and r["sets_per_s"] > 0 for r in rows)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["2", "3"]
    assert list((wd / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 3 and summary["compile_s"] > 0
    assert summary["flops_per_step_per_device"] > 0
    calls = [json.loads(r) for r in (wd / "hook_calls.jsonl").read_text().splitlines()]
    assert [c["step"] for c in calls] == [2]
    assert calls[0]["batch"] == ["images", "input_ids", "masks", "member_mask", "ref_mask"]
    assert calls[0]["frozen"] == ["text_encoder", "vae"] and calls[0]["ids"] == 16 and calls[0]["latent_channels"] == 4
    assert "samples -> " in log


def test_unknown_config_key_is_an_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jedi_jax.train", "--config", "configs/sd15.py:tiny", "--workdir",
                          str(tmp_path), "--config.train.stepz=3"], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "stepz" in out.stderr


def test_a_resume_with_another_trajectory_stops_with_one_line(tmp_path):
    """The checkpoint's config says train.lr=0.002, the command line's config 0.001: exit 2 before
    anything is built, one `error:` line naming the key and the way out."""
    import jax.numpy as jnp

    from jedi_jax.train import checkpoint as ckpt_lib

    saved = ckpt_lib.config_to_json(_cfg())
    saved["train"]["lr"] = 2e-3
    ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
    ck.save(2, {"w": jnp.zeros(())}, config=saved, data_state={})
    ck.close()
    out = subprocess.run([sys.executable, "-m", "jedi_jax.train", "--config", "configs/sd15.py:micro", "--workdir",
                          str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.lr (0.002 -> 0.001)" in errors[0] and "--allow_config_change" in errors[0]
    assert "Traceback" not in out.stderr


def _cfg(arg="micro"):
    from configs import sd15

    return sd15.get_config(arg)


def test_config_validation_up_front():
    from jedi_jax.train import trainer

    c = _cfg()
    c.train.steps = 0
    c.data.batch_size = 0
    c.mesh.rules = (("batch", ("data", "model")),)
    c.sample.every = -1
    c.train.loss_weighting = "image"
    c.train.subject_weight = -1.0
    c.train.subject_weight_high_noise, c.train.high_noise_from_t = 2.0, 1001
    with pytest.raises(ValueError) as e:
        trainer.validate_config(c)
    msg = str(e.value)
    for part in ("train.steps", "batch_size", "no axis", "sample.every", "train.loss_weighting",
                 "train.subject_weight", "train.high_noise_from_t=1001"):
        assert part in msg, msg
    trainer.validate_config(_cfg())  # the shipped variants validate
    trainer.validate_config(_cfg("tiny"))
    # optimizer values that cannot be meant, each named
    c = _cfg()
    c.train.lr, c.train.warmup_steps, c.train.end_lr_factor, c.train.grad_clip = -1e-4, -10, 2.0, -1.0
    c.train.weight_decay, c.train.b2, c.train.eps, c.train.peak_flops_per_chip = -0.1, 1.5, 0.0, -1.0
    c.train.steps, c.train.grad_accum = 7, 2
    c.model.dtype = "float16"
    c.data.hflip = 0.5  # on the mini world (the loader would refuse it too, but only after the models are built)
    c.data.crop_scale = (0.5, 1.0)  # a crop moves the subject into a held-out placement, as a flip does
    c.data.split = "test"  # MiniBench's subjects
    with pytest.raises(ValueError) as e:
        trainer.validate_config(c)
    msg = str(e.value)
    for part in ("train.lr=-0.0001", "train.warmup_steps=-10", "train.end_lr_factor=2.0", "train.grad_clip=-1.0",
                 "train.weight_decay=-0.1", "train.b2=1.5", "train.eps=0.0", "train.peak_flops_per_chip=-1.0",
                 "last 1 micro-steps", "model.dtype=float16", "data.hflip=0.5: mini-world renders",
                 "data.crop_scale=(0.5, 1.0) / crop_ratio=(1.0, 1.0): mini-world renders must not be cropped",
                 "data.split='test'"):
        assert part in msg, (part, msg)
    from configs import mini, sd15

    for module, variants in ((mini, ("", "gpu")), (sd15, ("", "tiny", "micro", "h100x8", "v5e-64"))):
        for variant in variants:  # every named variant validates (given a data set where it needs one)
            c = module.get_config(variant)
            c.data.source = c.data.source or "array_record:/data/sets"
            trainer.validate_config(c)
    with pytest.raises(ValueError, match="data.source"):
        trainer.validate_config(_cfg(""))  # the SD 1.5 default needs a data set


def test_urls_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """pathlib would turn gs://b/x into a local folder ./gs:/b/x on every host: no shared checkpoint,
    nothing in the bucket. Every path setting and --workdir refuses a URL, naming it."""
    from jedi_jax.train import trainer

    c = _cfg("tiny")
    c.model.pretrained, c.data.latent_vae = "gs://b/sd15-jax", "s3://b/vae"
    c.data.source = "array_record:gs://b/sets/1.0.0"
    with pytest.raises(trainer.ConfigError) as e:
        trainer.validate_config(c)
    for part in ("model.pretrained='gs://b/sd15-jax'", "data.latent_vae='s3://b/vae'",
                 "data.source='gs://b/sets/1.0.0'", "mount the bucket"):
        assert part in str(e.value), (part, str(e.value))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(trainer.ConfigError, match="--workdir='gs://b/runs/x': jedi_jax reads and writes local"):
        trainer.train(_cfg("tiny"), "gs://b/runs/x")
    from pathlib import Path

    with pytest.raises(trainer.ConfigError, match="--workdir='gs:/b/runs/x'"):  # pathlib collapsed its //
        trainer.train(_cfg("tiny"), Path("gs://b/runs/x"))
    assert not any(tmp_path.iterdir())  # no ./gs:/b/runs/x


def test_checkpoint_settings_are_validated():
    """The checkpoints' metric is the training loss (lower is better), whatever it is called: a
    'max' mode would keep the worst checkpoint as "best". keep=0 would silently mean 1."""
    from jedi_jax.train import trainer

    for key, value, part in (("best_metric", "fid", "best_metric='fid'"), ("best_mode", "max", "best_mode='max'"),
                             ("keep", 0, "checkpoint.keep=0"), ("keep_best", -1, "keep_best=-1")):
        c = _cfg()
        c.checkpoint[key] = value
        with pytest.raises(ValueError, match=part):
            trainer.validate_config(c)
    c = _cfg()
    c.checkpoint.keep, c.checkpoint.keep_best = 1, 0
    trainer.validate_config(c)


def test_inconsistent_model_sizes_are_rejected():
    from jedi_jax.train import models as models_lib

    c = _cfg()
    c.model.unet.in_channels = 4  # must be 2 * latent_channels + 1 = 9
    with pytest.raises(ValueError, match="in_channels"):
        models_lib.check_compatible(*models_lib.configs_from_dicts(c.model))
    c = _cfg()
    c.model.unet.cross_attention_dim = 32  # text encoder hidden size is 16
    with pytest.raises(ValueError, match="cross_attention_dim"):
        models_lib.check_compatible(*models_lib.configs_from_dicts(c.model))


@pytest.mark.parametrize("section,key", [("unet", "block_out_channelz"), ("vae", "latent_chanels"),
                                         ("text_encoder", "num_hiden_layers")])
def test_a_mistyped_architecture_key_is_a_config_error(section, key):
    """Config files replace model.unet / vae / text_encoder whole (so the lock does not cover their
    keys): a key none of the networks reads is refused up front, naming it, for all three."""
    from jedi_jax.train import trainer

    c = _cfg()
    trainer.validate_config(c)
    with c.model[section].unlocked():
        c.model[section][key] = 3
    with pytest.raises(trainer.ConfigError, match=key):
        trainer.validate_config(c)


@pytest.mark.parametrize("arg", ["", "tiny", "micro", "h100x8", "v5e-64"])
def test_configs_load_and_lock(arg):
    """Every variant comes back locked from get_config (configs/common.base_config locks): a key a
    config file misspells fails where it is written instead of being a setting nothing reads."""
    c = _cfg(arg)
    assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
    with pytest.raises(AttributeError, match="stepz"):
        c.train.stepz = 1
    c.train.steps = 7  # existing keys stay settable
    assert c.model.unet.in_channels == 2 * c.model.vae.latent_channels + 1


def test_a_failed_start_closes_the_checkpointer_and_the_loader(tmp_path, monkeypatch):
    """A failure after the checkpointer and the loader exist but before the loop's own `finally` (here
    the first batch) closes both (async save threads, loader threads), removes the folders the start
    created and re-raises the error."""
    from jedi_jax.train import checkpoint as ckpt_lib
    from jedi_jax.train import loader as loader_lib
    from jedi_jax.train import step as step_lib
    from jedi_jax.train import trainer

    closed = []
    for cls, name in ((ckpt_lib.Checkpointer, "checkpointer"), (loader_lib.SetLoader, "loader")):
        original = cls.close
        monkeypatch.setattr(cls, "close", lambda self, _o=original, _n=name: (closed.append(_n), _o(self))[1])

    def boom(batch):
        raise RuntimeError("boom in the first batch")

    monkeypatch.setattr(step_lib, "select_batch", boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(_cfg("micro"), tmp_path / "runs" / "run")
    assert sorted(closed) == ["checkpointer", "loader"]
    assert not (tmp_path / "runs").exists()  # the folders this start made are gone (checkpoints/ was empty)


@pytest.mark.parametrize("config,args,says", [
    ("micro", ["--config.train.step=10"], "--config.train.step: the config has no key 'step' (did you mean \"steps\""),
    ("sd16.py:tiny", [], "--config: cannot load the config file: [Errno 2] No such file"),
    ("tiyn", [], "ValueError: unknown variant 'tiyn'"),
    ("micro", ["--config.model.pretrained=nonexist"], "model.pretrained='nonexist': no model at nonexist"),
    ("micro", ["--config.data.source=array_record:/nonexistent/1.0.0"], "/nonexistent/1.0.0 does not exist"),
    ("h100x8", ["--config.data.source=mini_world", "--config.data.hflip=0", "--config.model.pretrained="],
     "mesh shape (1, 8) needs 8 devices, have 1"),
], ids=["mistyped-key", "missing-config-file", "unknown-variant", "no-model-folder", "no-data", "mesh"])
def test_start_up_mistakes_are_one_error_line_and_create_nothing(tmp_path, config, args, says):
    config = f"configs/{config}" if ".py" in config else f"configs/sd15.py:{config}"
    cmd = [sys.executable, "-m", "jedi_jax.train", "--config", config, *args, "--workdir", str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith("error: "), out.stderr
    assert says in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_a_bug_inside_a_config_file_keeps_its_traceback(tmp_path):
    """A KeyError in a config file's own code is not a mistyped override: it is not turned into an
    `error: --config.* ...` line (which would hide where it is), the traceback names the file."""
    bad = tmp_path / "bad_config.py"
    bad.write_text("TABLE = {'tiny': 1}\n\ndef get_config(arg=None):\n    return TABLE['gpu']\n")
    cmd = [sys.executable, "-m", "jedi_jax.train", "--config", str(bad), "--config.train.steps=3",
           "--workdir", str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" in out.stderr and "bad_config.py" in out.stderr, out.stderr[-3000:]
    assert "the config has no key" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["jedi_jax.train", "jedi_jax.train.vae_trainer", "jedi_jax.train.bench"])
def test_help_exits_0(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--config" in out.stdout and "python -m jedi_jax.train" in out.stdout


def test_a_second_trainer_on_a_busy_workdir_stops_before_touching_it(tmp_path):
    """While a run holds the workdir, a second trainer there exits 2 with one line naming the holder,
    before it trims metrics.jsonl (a run starting from step 0 keeps no row) or writes anything."""
    from jedi_jax.train.checkpoint import WorkdirLock

    wd = tmp_path / "dup"
    with WorkdirLock(wd):
        (wd / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
        before = sorted(p.name for p in wd.iterdir())
        out = subprocess.run([sys.executable, "-m", "jedi_jax.train", "--config", f"{REPO}/configs/sd15.py:micro",
                              "--workdir", "dup"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stderr == f"error: dup is in use by another training run (pid {os.getpid()}, holding dup/.lock)\n"
    assert sorted(p.name for p in wd.iterdir()) == before
    assert len((wd / "metrics.jsonl").read_text().splitlines()) == 2


def test_multi_process_runs_all_stop_when_process_0_cannot_lock(tmp_path):
    """Only process 0 locks the shared workdir; an all-gather tells the others, so when it cannot, every
    process stops with exit 2 at once instead of waiting in a collective for a process 0 that left."""
    import socket

    from jedi_jax.train.checkpoint import WorkdirLock

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    wd = tmp_path / "run"
    with WorkdirLock(wd):
        procs = [subprocess.Popen([sys.executable, "-m", "jedi_jax.train", "--config", "configs/sd15.py:micro",
                                   "--workdir", str(wd), f"--coordinator=localhost:{port}", "--num_processes=2",
                                   f"--process_id={i}"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for _, err in outs]
    assert errors[0] == [f"error: {wd} is in use by another training run (pid {os.getpid()}, holding {wd}/.lock)"]
    assert errors[1] == [f"error: {wd} cannot be used (process 0 could not lock {wd}/.lock)"]


def test_a_stale_pool_cache_is_a_config_error(tmp_path):
    """A data source that cannot serve the config (here a pool cache of other sets), found only once the
    loader is built, is a ConfigError naming data.source (one CLI line), and the start removes its folder."""
    import numpy as np

    from jedi_jax.train import trainer

    np.savez(tmp_path / "pool.npz", images=np.zeros((1, 1, 64, 64, 3), np.uint8), split="train")
    c = _cfg("micro")
    c.data.source, c.data.pool_cache = "jedi_jax.data.pool:from_config", str(tmp_path / "pool.npz")
    with pytest.raises(trainer.ConfigError, match=r"data.source='jedi_jax.data.pool:from_config': pool cache .* delete"):
        trainer.train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_exit_codes_map_start_up_mistakes_to_2_and_a_second_ctrl_c_to_130(capsys):
    """Both trainers' CLIs run `train` inside trainer.cli_exit_codes: a user's mistake is one line and
    exit 2, a KeyboardInterrupt (the second Ctrl-C) one line and 130, any other error its traceback."""
    from jedi_jax.train.checkpoint import WorkdirError
    from jedi_jax.train.trainer import ConfigChangeError, ConfigError, cli_exit_codes

    for error, code in ((ConfigError("bad key x"), 2), (ConfigChangeError("train.lr (1 -> 2)"), 2),
                        (WorkdirError("DIR is in use"), 2), (KeyboardInterrupt(), 130)):
        with pytest.raises(SystemExit) as e, cli_exit_codes():
            raise error
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == code and len(err) == 1 and err[0].startswith("error: "), (error, err)
        assert str(error) in err[0] if code == 2 else "without saving" in err[0]
    with pytest.raises(ZeroDivisionError), cli_exit_codes():  # a bug is not a user's mistake
        1 / 0
    assert capsys.readouterr().err == ""
