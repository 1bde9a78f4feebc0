"""`python -m jedi_jax.train.bench`: the train-step throughput / MFU / memory figures of a config,
run on a tiny SD-layout config (the same code measures SD 1.5 at 512 px on a GPU)."""
import json
import os
import subprocess
import sys
import threading
import time

from test_train_sharding import FAST_XLA, REPO


def test_bench_cli_reports_consistent_figures(tmp_path):
    out, flag = tmp_path / "bench.json", tmp_path / "go"
    # The flag appears only after a delay: the bench must compile, then wait for it before timing.
    threading.Timer(3.0, flag.touch).start()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_XLA}")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "jedi_jax.train.bench", "--config", "configs/sd15.py:tiny",
         "--config.model.pretrained=", "--config.data.batch_size=2", "--config.data.set_size=3",
         "--config.data.image_size=16", "--steps", "2", "--out", str(out), "--wait_for", str(flag)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "waiting for" in proc.stdout
    r = json.loads(out.read_text())
    assert time.time() - t0 > 3.0
    assert (r["sets_per_device"], r["set_size"], r["image_size"], r["devices"]) == (2, 3, 16, 1)
    assert r["step_s"] > 0 and abs(r["sets_per_s"] * r["step_s"] - 2) < 1e-6
    assert abs(r["images_per_s_per_chip"] - 3 * r["sets_per_s"]) < 1e-6
    assert r["flops_per_step_per_device"] > 1e6 and r["mfu"] is None  # CPU: no peak FLOP/s, no MFU
    assert 0 < r["loss"] < 10 and r["unet_params_m"] > 0.1
    assert r["argument_gb"] > 0 and r["temp_gb"] > 0  # XLA memory analysis of the compiled step
