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


def test_flops_of_a_scan_kernel_are_counted_on_the_xla_kernel():
    """XLA's cost analysis counts a scan body once: a step on the "chunked" attention kernel (4 key
    chunks here) reports about a quarter of its attention FLOPs, and MFU would read low. Given the
    same step on the "xla" kernel, compile_train_step counts FLOPs on that instead."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jedi_jax.models import attention
    from jedi_jax.train import sharding as shd
    from jedi_jax.train import step as step_lib

    mesh = shd.make_mesh(("data", "fsdp"), (1, 1), devices=jax.devices()[:1])
    rep = NamedSharding(mesh, P())

    def make_step(kernel):
        def train_step(state, batch, frozen, key):
            def loss(w):
                x = jnp.einsum("blhd,de->blhe", batch["x"], w)  # (B, L, H, D)
                return jnp.mean(attention.dot_product_attention(x, x, x, kernel=kernel) ** 2)
            value, grad = jax.value_and_grad(loss)(state["w"])
            return {"w": state["w"] - 0.1 * grad}, {"loss": value}
        return train_step

    attention.register_kernel("chunked_64", attention.make_chunked_kernel(64))
    args = dict(abstract_state={"w": jax.ShapeDtypeStruct((32, 32), jnp.float32)}, state_shardings={"w": rep},
                abstract_batch={"x": jax.ShapeDtypeStruct((2, 256, 2, 32), jnp.float32)}, batch_sharding=rep,
                abstract_frozen={}, frozen_shardings={}, mesh=mesh)
    xla = step_lib.compile_train_step(make_step("xla"), **args)[1]
    chunked = step_lib.compile_train_step(make_step("chunked_64"), **args)[1]
    fixed = step_lib.compile_train_step(make_step("chunked_64"), flops_train_step=make_step("xla"), **args)[1]
    assert chunked["flops"] < 0.6 * xla["flops"], (chunked, xla)  # the undercount this guards against
    assert abs(fixed["flops"] / xla["flops"] - 1) < 0.1, (fixed, xla)
    assert fixed["flops_from"].endswith("xla attention kernel") and xla["flops_from"] == "compiled step"


def test_peak_flops_table_matches_the_most_specific_name():
    from types import SimpleNamespace

    from jedi_jax.train.step import peak_flops_per_chip

    def peak(kind, platform="gpu"):
        return peak_flops_per_chip(SimpleNamespace(platform=platform, device_kind=kind))

    assert peak("NVIDIA L40S") == 362e12 and peak("NVIDIA L40") == 181e12 and peak("NVIDIA L4") == 121e12
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA H100 80GB HBM3") == 989e12
    assert peak("NVIDIA H100 NVL") == 835e12
    assert peak("NVIDIA H200") == 989e12 and peak("TPU v5 lite") == 197e12 and peak("TPU v5p") == 459e12
    assert peak("Some new accelerator") is None and peak("cpu", platform="cpu") is None


def test_bench_batch_is_the_trainers_latents_for_a_latent_pool_config():
    """configs/mini.py trains on precomputed latents: a bench batch of images would time a VAE
    encoder the real step never runs."""
    from types import SimpleNamespace

    from configs import mini, sd15
    from jedi_jax.train.bench import synthetic_batch

    models = SimpleNamespace(vae_factor=4, latent_channels=4)
    c = mini.get_config("")
    c.data.latent_vae = "jedi_jax/assets/jedi_mini"
    batch = synthetic_batch(c, 1, models)
    assert "images" not in batch and batch["latents"].shape == (8, 4, 16, 16, 4)
    assert batch["input_ids"].shape[:2] == batch["member_mask"].shape == batch["ref_mask"].shape == (8, 4)
    pixels = synthetic_batch(sd15.get_config("tiny"), 1, models)  # an image source: images, as the loader's
    assert "latents" not in pixels and pixels["images"].ndim == 5
