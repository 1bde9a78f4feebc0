"""Fault tolerance of `python -m jedi_jax.train`: SIGKILL after a checkpoint + resume ends with the
parameters of an uninterrupted run (same data order, same noise: keys are fold_in(key, step)) and
logs every step once; SIGTERM mid-run leaves a complete checkpoint of the step reached and exits 0;
a checkpoint written on one mesh restores onto another."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from test_train_checkpoint_io import _cfg as _fast_cfg
from test_train_checkpoint_io import _purge_steps, fast_steps  # noqa: F401 - fast_steps: a fixture
from test_train_sharding import FAST_XLA, REPO, run_script

STEPS = 16


def _env() -> dict:
    # the run's shared compilation cache comes with os.environ (conftest.py): the trainers after the
    # first load its programs
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_XLA}")


# `python -m jedi_jax.train` with Ctrl-C and SIGHUP at their defaults: a child inherits ignored signals,
# and a suite started under nohup or as a background job (`make test &`) ignores SIGHUP / SIGINT
_TRAIN_WITH_DEFAULT_SIGNALS = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                               "signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                               "runpy.run_module('jedi_jax.train', run_name='__main__', alter_sys=True)")


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _TRAIN_WITH_DEFAULT_SIGNALS, "--config", "configs/sd15.py:micro",
           "--workdir", str(workdir), f"--config.train.steps={STEPS}", "--config.checkpoint.every=4",
           "--config.train.log_every=1", *extra]
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / f"{workdir.name}.{time.time_ns()}.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            text=True)
    proc.log_path = log
    return proc


def _wait_for(pred, proc: subprocess.Popen, timeout=400.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(0.02)
    raise TimeoutError


def _finalized_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _logged_steps(workdir: Path, *, strict: bool = True) -> list[int]:
    """The steps in metrics.jsonl; strict=False skips a line being written (a running trainer's)."""
    f = workdir / "metrics.jsonl"
    steps = []
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            if strict:
                raise
    return steps


def _logged_past_checkpoint(workdir: Path) -> bool:
    done = _finalized_steps(workdir)
    return bool(done) and max(_logged_steps(workdir, strict=False), default=0) > done[-1]


def _state(workdir: Path, step: int) -> dict:
    with ocp.StandardCheckpointer() as ck:
        return ck.restore((workdir / "checkpoints" / str(step) / "state").absolute())


def _logs(workdir: Path, tail: int = 3000) -> str:
    return "\n".join(p.read_text()[-tail:] for p in sorted(workdir.parent.glob(f"{workdir.name}.*.log")))


@pytest.mark.slow
def test_sigkill_resume_and_sigterm_match_uninterrupted_run(tmp_path):
    a_dir, b_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    a = None
    b = _start(b_dir)
    try:
        # 1. SIGKILL as soon as a checkpoint is finalized and a later step logged (maybe mid-way
        #    through a later save): the resumed run logs those steps again.
        _wait_for(lambda: _logged_past_checkpoint(b_dir), b)
        b.send_signal(signal.SIGKILL)
        assert b.wait(60) == -signal.SIGKILL, _logs(b_dir)
        killed_at = _finalized_steps(b_dir)[-1]
        assert killed_at < STEPS, "the run finished before it could be killed"
        # The uninterrupted reference, checkpointing every step (its programs are in the cache now).
        a = _start(a_dir, "--config.checkpoint.every=1", f"--config.checkpoint.keep={STEPS}")

        # 2. Resume; SIGTERM once it has trained past the restored step: exit 0 with a checkpoint
        #    of exactly the step reached (also when that is no multiple of checkpoint.every).
        c = _start(b_dir)
        _wait_for(lambda: f"step {killed_at + 2}/{STEPS} |" in c.log_path.read_text(), c)
        c.send_signal(signal.SIGTERM)
        assert c.wait(120) == 0, _logs(b_dir)
        assert f"resumed from {b_dir}/checkpoints/{killed_at}" in _logs(b_dir, tail=10**6)
        summary = json.loads((b_dir / "summary.json").read_text())
        assert summary["status"] == "preempted", summary
        reached = summary["step"]
        assert killed_at < reached < STEPS
        assert _finalized_steps(b_dir)[-1] == reached
        assert not any(p.name.endswith("tmp") for p in (b_dir / "checkpoints").iterdir())  # complete or absent
        assert a.wait(400) == 0, _logs(a_dir)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()

    # The killed-resumed-preempted run's checkpoint equals the uninterrupted run's at the same step:
    # params, optimizer moments, EMA and step (bitwise up to 1e-6).
    want, got = _state(a_dir, reached), _state(b_dir, reached)
    assert int(np.asarray(got["step"])) == reached
    flat_w, flat_g = ocp.tree.to_flat_dict(want), ocp.tree.to_flat_dict(got)
    assert flat_w.keys() == flat_g.keys()
    worst = max(float(np.max(np.abs(np.asarray(flat_w[k], np.float64) - np.asarray(flat_g[k], np.float64))))
                for k in flat_w)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"
    # Every step is logged once: the resume dropped the killed run's rows after its checkpoint, and
    # TensorBoard purges its points from there on. The losses both runs logged agree (same data, noise).
    assert _logged_steps(b_dir) == list(range(1, reached + 1))
    assert killed_at + 1 in _purge_steps(b_dir / "tb")
    la = {r["step"]: r["loss"] for r in map(json.loads, (a_dir / "metrics.jsonl").read_text().splitlines())}
    lb = {r["step"]: r["loss"] for r in map(json.loads, (b_dir / "metrics.jsonl").read_text().splitlines())}
    assert all(abs(la[s] - lb[s]) < 1e-6 for s in range(1, reached + 1))


MESH_SCRIPT = r"""
import json, sys, jax, numpy as np
from configs import sd15
from jedi_jax.train import checkpoint as ckpt_lib, models as models_lib, sharding as shd, state as state_lib

cfg = sd15.get_config("micro")
rules = shd.DEFAULT_RULES
tx, _ = state_lib.make_optimizer(cfg.train)
meshes = {"data2_fsdp4": shd.make_mesh(("data", "fsdp"), (2, 4)),
          "fsdp8": shd.make_mesh(("data", "fsdp"), (1, 8)),
          "single": shd.make_mesh(("data", "fsdp"), (1, 1), devices=jax.devices()[:1])}
bundle = models_lib.build(cfg.model, mesh=meshes["data2_fsdp4"], rules=rules, seed=0)
init = lambda k: state_lib.create_state(bundle.unet_init(k), tx, True)
abstract = jax.eval_shape(init, jax.random.key(0))
state = jax.jit(init, out_shardings=state_lib.state_shardings_for(abstract, tx, meshes["data2_fsdp4"], rules))(jax.random.key(0))
state = state.replace(step=state.step + 7)
ck = ckpt_lib.Checkpointer(sys.argv[1], keep=2)
ck.save(7, state, config={"seed": 0}, data_state={"epoch": 0, "position": 56}, metrics={"loss": 0.5})
ck.wait()
host = jax.device_get(state)
res = {}
for name in ("fsdp8", "single"):
    sh = state_lib.state_shardings_for(abstract, tx, meshes[name], rules)
    restored, config, data = ck.restore(None, shd.with_shardings(abstract, sh))
    same = all(np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(host)))
    placed = all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh)))
    res[name] = {"same": same, "placed": placed, "config": config, "data": data,
                 "conv_in": str(restored.params["conv_in"]["kernel"].sharding.spec),
                 "devices": len(restored.params["conv_in"]["kernel"].sharding.device_set)}
ck.close()
print("RESULT", json.dumps(res))
"""


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    out = run_script(MESH_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "ck"))), devices=8)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    for name, devices in (("fsdp8", 8), ("single", 1)):
        r = res[name]
        assert r["same"] and r["placed"], r
        assert r["devices"] == devices
        assert r["config"] == {"seed": 0} and r["data"] == {"epoch": 0, "position": 56}
    assert res["fsdp8"]["conv_in"] == str(P(None, None, None, "fsdp"))
    assert res["single"]["conv_in"] == str(P())


def test_keeps_last_k_and_best_checkpoint(tmp_path):
    import jax
    import jax.numpy as jnp

    from jedi_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "ck", keep=2, keep_best=1, best_metric="loss", best_mode="min", async_save=True)
    for step, loss in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0]):
        state = {"w": jnp.full((3,), float(step))}
        ck.save(step, state, config={"step": step}, data_state={"position": step}, metrics={"loss": loss})
    ck.save(6, {"w": jnp.full((3,), 6.0)}, config={}, data_state={}, metrics=None)  # e.g. a pre-emption save
    ck.wait()
    assert ck.all_steps() == [2, 5, 6]  # the best (loss 1.0) and the last two
    assert ck.best_step() == 2
    target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    state, config, data = ck.restore(2, target)
    assert float(state["w"][0]) == 2.0 and config == {"step": 2} and data == {"position": 2}
    ck.close()


def test_resume_judges_keys_the_checkpoint_lacks_by_the_code_defaults(caplog):
    """A key the checkpoint's config lacks (added by a newer version of the code) resumes with a
    warning at its default (configs/common.py), what the older code most likely did; at another value,
    or with no default at all, it is refused (unless operational, or allow). A key the current config
    lacks (removed) is only warned about. Keys are judged leaf by leaf: a sub-dict a config file
    replaces whole (model.unet) or a section the checkpoint lacks whole (schedule)."""
    from test_train_checkpoint_io import _cfg

    from jedi_jax.train import trainer
    from jedi_jax.train.checkpoint import config_to_json

    defaults = trainer.default_config()
    assert defaults["data"]["crop_scale"] == [1.0, 1.0]  # the checkpoints' JSON form (lists, not tuples)

    def resume(current, allow=False, drop=("train.subject_weight", "data.crop_scale", "schedule")):
        saved = config_to_json(_cfg())
        for key in drop:  # what a checkpoint written before these keys existed holds
            *path, name = key.split(".")
            section = saved
            for p in path:
                section = section[p]
            del section[name]
        return trainer.check_config_changes(saved, config_to_json(current), 2, allow=allow, defaults=defaults)

    with caplog.at_level("WARNING", logger="jedi_jax.train"):
        changed = resume(_cfg())  # every added key at its default (a tuple one included)
    assert {"train.subject_weight", "data.crop_scale", "schedule.beta_end"} <= set(changed)
    assert "train.subject_weight: '<absent>' -> 0.0" in caplog.text
    with pytest.raises(trainer.ConfigChangeError) as e:
        resume(_cfg(**{"train.subject_weight": 0.5}))
    assert "train.subject_weight (not in the checkpoint's config, default 0.0 -> 0.5)" in str(e.value)
    assert "crop_scale" not in str(e.value) and "schedule" not in str(e.value)
    assert "train.subject_weight" in resume(_cfg(**{"train.subject_weight": 0.5}), allow=True)
    # model.unet is replaced whole by the micro config: its 8 groups are not the default's 32
    with pytest.raises(trainer.ConfigChangeError, match=r"model\.unet\.norm_num_groups \(not in .*default 32 -> 8\)"):
        resume(_cfg(), drop=("model.unet.norm_num_groups",))
    current = config_to_json(_cfg())
    current["train"]["unknown_to_the_defaults"] = 1  # no default either: nothing says what the checkpoint ran
    with pytest.raises(trainer.ConfigChangeError, match=r"unknown_to_the_defaults \(not in .*no default -> 1\)"):
        trainer.check_config_changes(config_to_json(_cfg()), current, 2, allow=False, defaults=defaults)
    saved = config_to_json(_cfg())
    saved["train"]["removed_by_this_version"] = 1  # a removed key: warned about only
    assert trainer.check_config_changes(saved, config_to_json(_cfg()), 2, allow=False, defaults=defaults) == [
        "train.removed_by_this_version"]
    # an operational key away from its default (num_workers 8) resumes
    assert resume(_cfg(**{"data.num_workers": 3}), drop=("data.num_workers",)) == ["data.num_workers"]


def test_vae_trainer_judges_added_keys_by_the_mini_vae_defaults(tmp_path):
    """The VAE trainer's resume check compares a key its checkpoint's config lacks with
    configs/mini_vae.py's base_config: at its default it resumes, at another value it is refused."""
    from configs import mini_vae

    from jedi_jax.train import vae_trainer
    from jedi_jax.train.checkpoint import config_to_json
    from jedi_jax.train.trainer import ConfigChangeError

    config = mini_vae.get_config("tiny")
    saved = config_to_json(config)
    del saved["train"]["l2_weight"]  # a run started before the key existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    vae_trainer.check_resume_config(tmp_path, config, 15, allow=False)  # at its default 0.0
    config.train.l2_weight = 0.1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigChangeError, match=r"train\.l2_weight \(not in the checkpoint's config, default 0\.0 -> "):
        vae_trainer.check_resume_config(tmp_path, config, 15, allow=False)


def test_latent_vae_of_the_pretrained_folder_is_not_loaded_again(monkeypatch):
    """check_frozen: a data.latent_vae naming model.pretrained's folder (spelled another way) is the
    frozen VAE by construction, so start-up does not load and hash it a second time (the data loader
    loads it anyway); another folder is loaded, hashed and compared with the frozen VAE."""
    import types

    import ml_collections

    from jedi_jax import loading
    from jedi_jax.assets import DEFAULT_MODEL_DIR
    from jedi_jax.convert.param_io import params_fingerprint
    from jedi_jax.train import trainer

    loaded = []

    def load_component(folder, name, **_):
        loaded.append((str(folder), name))
        return types.SimpleNamespace(params={"w": np.zeros(2, np.float32)})

    monkeypatch.setattr(loading, "load_component", load_component)

    def cfg(latent_vae):
        return ml_collections.ConfigDict({"seed": 0, "model": {"pretrained": str(DEFAULT_MODEL_DIR)},
                                          "data": {"latent_vae": latent_vae}})

    # a digest no load could match: loading here would raise "is not the model's VAE"
    trainer.check_frozen(cfg(str(DEFAULT_MODEL_DIR / "vae" / "..")), {"vae": "unhashed"}, None, None, allow=False)
    assert loaded == []
    frozen = {"vae": params_fingerprint({"w": np.zeros(2, np.float32)})}
    trainer.check_frozen(cfg("elsewhere"), frozen, None, None, allow=False)
    assert loaded == [("elsewhere", "vae")]
    with pytest.raises(trainer.ConfigError, match="is not the model's VAE"):
        trainer.check_frozen(cfg("elsewhere"), {"vae": "another"}, None, None, allow=False)


# ----------------------------------------------------------------------------- one run per workdir; Ctrl-C


def test_workdir_lock_is_exclusive_and_a_failed_start_removes_only_what_it_created(tmp_path):
    """WorkdirLock: a second holder fails at once naming the first one's pid; discard_new (a failed
    start) removes the folders the start made, or only the entries it added to one that existed, and
    nothing once training began; the lock is free again after the holder leaves."""
    from jedi_jax.train.checkpoint import WorkdirError, WorkdirLock

    with WorkdirLock(tmp_path / "runs" / "a") as lock:  # makes runs/ and runs/a/
        with pytest.raises(WorkdirError, match=rf"runs/a is in use by another training run \(pid {os.getpid()}, "
                                               r"holding .*runs/a/\.lock\)"):
            WorkdirLock(tmp_path / "runs" / "a").__enter__()
        (lock.path / "checkpoints").mkdir()
        (tmp_path / "runs" / "b").mkdir()  # another run's folder, made beside it meanwhile
        lock.discard_new()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["b"]  # runs/ kept: not empty

    existing = tmp_path / "runs" / "b"
    (existing / "keep.txt").write_text("mine")
    with WorkdirLock(existing) as lock:
        (existing / "checkpoints").mkdir()
        (existing / "metrics.jsonl").write_text("")
        (existing / "identity_curve.json").write_text("{}")  # another tool's output, written meanwhile
        lock.discard_new()
    assert sorted(p.name for p in existing.iterdir()) == [".lock", "identity_curve.json", "keep.txt"]

    # a path through a folder that does not exist and back ("missing/../b") names the existing run:
    # its files stay, and no stray folder is made
    with WorkdirLock(tmp_path / "runs" / "missing" / ".." / "b") as lock:
        assert lock.path == existing
        lock.discard_new()
    assert (existing / "keep.txt").read_text() == "mine" and not (tmp_path / "runs" / "missing").exists()

    with WorkdirLock(tmp_path / "c") as lock:
        lock.started()  # training began: what it wrote is the run's output
        (lock.path / "metrics.jsonl").write_text("")
        lock.discard_new()
    with WorkdirLock(tmp_path / "c"):  # released on exit
        pass
    assert (tmp_path / "c" / "metrics.jsonl").exists()


def test_workdir_lock_is_released_when_its_holder_is_killed(tmp_path):
    """The OS drops a flock when the process ends, SIGKILL included: a killed run's resume can start."""
    from jedi_jax.train.checkpoint import WorkdirLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom jedi_jax.train.checkpoint import WorkdirLock\n"
        f"with WorkdirLock({str(tmp_path / 'run')!r}):\n    print('held', flush=True)\n    time.sleep(600)\n")],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from jedi_jax.train.checkpoint import WorkdirError

        with pytest.raises(WorkdirError, match=f"pid {holder.pid}"):
            WorkdirLock(tmp_path / "run").__enter__()
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
    with WorkdirLock(tmp_path / "run"):
        pass


def test_orbax_read_only_and_metric_less_saves_log_nothing(tmp_path, caplog):
    """Read-only opens (export, learning curves: once per checkpoint) and saves without a finite loss
    logged orbax warnings about settings chosen on purpose; exactly those are dropped."""
    import jax.numpy as jnp

    from jedi_jax.train import checkpoint as ckpt_lib

    with caplog.at_level("WARNING", logger="absl"):
        ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
        ck.save(1, {"w": jnp.zeros(())}, config={"a": 1}, data_state={}, metrics=None)
        ck.close()
        assert ckpt_lib.read_json_item(tmp_path / "ck") == {"a": 1}
        logging.getLogger("absl").warning("Given directory is read only (some other message)")
        logging.getLogger("absl").warning({"a": 1})  # a message that is not a string (unhashable) passes too
    assert [r.getMessage() for r in caplog.records] == ["Given directory is read only (some other message)",
                                                        "{'a': 1}"]


class _Aborted(Exception):
    """Raised by the tests' stand-in for Python's SIGINT handler (KeyboardInterrupt would end pytest)."""


@pytest.fixture
def sigint_raises_aborted():
    def abort(signum, frame):
        raise _Aborted

    previous = signal.signal(signal.SIGINT, abort)
    try:
        yield abort
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_and_stops_and_a_second_one_aborts(tmp_path, fast_steps, caplog, sigint_raises_aborted):
    """A first Ctrl-C (SIGINT) stops like SIGTERM: checkpoint of the step reached, status 'preempted',
    saying so; it hands SIGINT back to the handler it had (Python's raises KeyboardInterrupt), so a
    second one aborts at once, saving nothing."""
    from jedi_jax.train import checkpoint as ckpt_lib
    from jedi_jax.train import trainer

    def sigint():
        os.kill(os.getpid(), signal.SIGINT)

    cfg = _fast_cfg(**{"train.steps": 4, "checkpoint.every": 4})
    fast_steps[2] = sigint
    with caplog.at_level("WARNING", logger="jedi_jax.train"):
        out = trainer.train(cfg, tmp_path / "run")
    assert out["status"] == "preempted" and out["step"] == 2 and out["signal"] == "SIGINT", out
    assert "interrupted: checkpoint of step 2 written; re-run the same command to resume" in caplog.text
    assert ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).all_steps() == [2]
    assert signal.getsignal(signal.SIGINT) is sigint_raises_aborted

    fast_steps.clear()
    fast_steps[3] = lambda: (sigint(), sigint())  # the resumed run gets two
    with pytest.raises(_Aborted):
        trainer.train(_fast_cfg(**{"train.steps": 4, "checkpoint.every": 4}), tmp_path / "run")
    assert ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).all_steps() == [2]
    assert signal.getsignal(signal.SIGINT) is sigint_raises_aborted


def test_ctrl_c_on_the_cli_saves_the_step_reached_and_exits_0(tmp_path):
    wd = tmp_path / "run"
    proc = _start(wd)
    try:
        _wait_for(lambda: f"step 2/{STEPS} |" in proc.log_path.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, _logs(wd)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.log_path.read_text()
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["signal"] == "SIGINT", summary
    assert 2 <= summary["step"] < STEPS and _finalized_steps(wd)[-1] == summary["step"]
    assert f"interrupted: checkpoint of step {summary['step']} written; re-run the same command to resume" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
