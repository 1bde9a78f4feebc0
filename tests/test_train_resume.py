"""Fault tolerance of `python -m jedi_jax.train`: SIGKILL after a checkpoint + resume ends with the
parameters of an uninterrupted run (same data order, same noise: keys are fold_in(key, step)) and
logs every step once; SIGTERM mid-run leaves a complete checkpoint of the step reached and exits 0;
a checkpoint written on one mesh restores onto another."""
import json
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

from test_train_checkpoint_io import _purge_steps
from test_train_sharding import FAST_XLA, REPO, run_script

STEPS = 16


def _env() -> dict:
    # the run's shared compilation cache comes with os.environ (conftest.py): the trainers after the
    # first load its programs
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_XLA}")


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jedi_jax.train", "--config", "configs/sd15.py:micro", "--workdir", str(workdir),
           f"--config.train.steps={STEPS}", "--config.checkpoint.every=4", "--config.train.log_every=1", *extra]
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
