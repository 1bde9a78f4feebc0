"""The launch scripts: each parses, prints its usage when called without arguments, and the one-GPU
session script runs end to end on this CPU (tiny settings through its environment overrides).

A lent GPU gives a session one short try, so ``launch/one_gpu_session.sh`` must work the first
time: the dry run below goes through every stage it has (time-boxed JeDi-mini training stopped by
SIGTERM, the SD-layout train-step benchmark waiting for the GPU to be free, the learning curve,
the packed checkpoint) and then does what its header says to do afterwards on any machine: unpack
the checkpoint parts and export a model folder that loads.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_train_sharding import FAST_XLA, REPO

LAUNCH = REPO / "launch"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.sh")))
def test_launch_script_parses(script):
    res = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script, words", [("tpu_vm.sh", "NAME ZONE ACCELERATOR CONFIG WORKDIR"),
                                           ("gpu_slurm.sh", "sbatch --nodes=2"),
                                           ("one_gpu_session.sh", "usage: one_gpu_session.sh OUT_DIR")])
def test_launch_script_without_arguments_prints_usage_and_exits_2(script, words):
    res = subprocess.run(["bash", str(LAUNCH / script)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode != 0 and words in res.stdout + res.stderr
    if script != "one_gpu_session.sh":  # that one fails through bash's ${1:?}, exit 1
        assert res.returncode == 2


def test_one_gpu_session_dry_run_on_cpu(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), RUN_DIR=str(run),
               XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_XLA}",
               MINI_CONFIG="configs/mini.py",
               MINI_ARGS=(f"--config.data.num_sets=6 --config.data.batch_size=2 --config.checkpoint.every=3 "
                          f"--config.checkpoint.keep=2 --config.sample.every=0 --config.train.log_every=1 "
                          f"--config.data.pool_cache={tmp_path / 'pool.npz'}"),
               BENCH_CONFIG="configs/sd15.py:tiny", BENCH_SETS="2",
               BENCH_ARGS="--config.data.set_size=3 --config.data.image_size=16",
               CURVE_SUBJECTS="2", CURVE_SECONDS="240")
    # A 75 s time box: start-up (pool render + encode, compiling beside the bench) took ~32 s here and
    # the first checkpoint comes 3 steps later; the rest is margin for a CI machine busy with other tests.
    res = subprocess.run(["bash", str(LAUNCH / "one_gpu_session.sh"), str(out), "75"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text() for p in out.glob("*.log")}
    why = res.stdout[-2000:] + "".join(f"\n--- {k}\n{v[-2000:]}" for k, v in logs.items())
    assert res.returncode == 0, why

    # 1. Training ran until the time box's SIGTERM and saved the step it reached.
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3, why
    # 2. The benchmark timed its steps only after training was done, and wrote its figures.
    assert "bench exit 0" in logs["bench.log"] and "waiting for" in logs["bench.log"], why
    bench = json.loads((out / "bench_sd15.json").read_text())
    assert bench["sets_per_s"] > 0 and (bench["set_size"], bench["image_size"]) == (3, 16)
    # 3. The learning curve scored every kept checkpoint.
    assert "curve exit 0" in logs["curve.log"], why
    curve = json.loads((run / "identity_curve.json").read_text())
    assert [c["step"] for c in curve] == steps and all(np.isfinite(c["normalized"]) for c in curve)
    # 4. The packed checkpoint, reassembled as the script's header says, exports a model that loads.
    parts = sorted(out.glob("ckpt.tar.part-*"))
    assert parts and (out / "run_logs.tgz").exists()
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar -x -C {unpacked}", shell=True, check=True)
    script = (
        "import sys, numpy as np, jax\n"
        "from jedi_jax.train.export import main\n"
        f"assert main(['--workdir', {str(unpacked)!r}, '--dst', {str(tmp_path / 'model')!r}]) == 0\n"
        "from jedi_jax.pipeline import JeDiPipeline\n"
        f"new = JeDiPipeline.from_pretrained({str(tmp_path / 'model')!r})\n"
        "old = JeDiPipeline.from_pretrained()\n"
        "a, b = jax.tree.leaves(new.model.unet.params), jax.tree.leaves(old.model.unet.params)\n"
        "assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))\n"
        "print('changed', any(not np.array_equal(x, y) for x, y in zip(a, b)))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "changed True" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
