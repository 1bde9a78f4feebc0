"""Sharding: logical-axis rules as data (jedi_jax/train/sharding.py), and one JeDi train step on a
(data=2, fsdp=4) mesh of 8 fake CPU devices equals the single-device step."""
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from jedi_jax.train import sharding as shd

REPO = Path(__file__).resolve().parents[1]
# Compile-bound CPU tests: less XLA optimization (the same flags in every run being compared).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_script(script: str, *, devices: int, cwd=REPO, timeout=600, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}")
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"script failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


FAKE_MESH = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 1}, axis_names=("data", "fsdp", "tensor"))


def test_mesh_shape_fill_and_errors():
    assert shd.resolve_mesh_shape((2, -1), 8) == (2, 4)
    assert shd.resolve_mesh_shape((1, 8), 8) == (1, 8)
    for bad in [(3, -1), (-1, -1), (2, 2)]:
        with pytest.raises(ValueError):
            shd.resolve_mesh_shape(bad, 8)


def test_logical_axes_by_leaf_kind():
    assert shd.logical_axes(("conv_in", "kernel"), (3, 3, 9, 320)) == (None, None, "conv_in", "conv_out")
    assert shd.logical_axes(("to_q", "kernel"), (320, 320)) == ("embed", "mlp")
    assert shd.logical_axes(("token_embedding", "embedding"), (49408, 768)) == ("vocab", "embed")
    assert shd.logical_axes(("norm", "scale"), (320,)) == ("norm",)
    assert shd.logical_axes(("x", "bias"), (4,)) == ("norm",)


def test_rules_map_divisible_dims_and_fall_back_to_replication():
    rules = shd.DEFAULT_RULES
    spec = lambda path, shape: shd.spec_for(shd.logical_axes(path, shape), shape, FAKE_MESH, rules)  # noqa: E731
    assert spec(("conv", "kernel"), (3, 3, 9, 320)) == P(None, None, None, "fsdp")
    assert spec(("conv", "kernel"), (3, 3, 320, 3)) == P()  # 3 % 4: replicated
    assert spec(("lin", "kernel"), (320, 1280)) == P("fsdp")
    assert spec(("lin", "kernel"), (30, 1280)) == P()
    assert spec(("emb", "embedding"), (49408, 768)) == P(None, "fsdp")
    assert spec(("norm", "scale"), (320,)) == P()
    # A mesh axis is used once per array; size-1 mesh axes are dropped; batch over both axes.
    both = (("embed", "fsdp"), ("mlp", ("fsdp", "tensor")))
    assert shd.spec_for(("embed", "mlp"), (8, 8), FAKE_MESH, both) == P("fsdp")
    assert shd.spec_for(("batch",), (16,), FAKE_MESH, shd.DEFAULT_RULES) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="no axis"):
        shd.check_rules((("batch", "data"), ("embed", "model")), ("data", "fsdp"))
    shd.check_rules(shd.DEFAULT_RULES, ("data", "fsdp"))
    # a misspelled logical name would leave every linear kernel replicated; no batch rule, the batch
    with pytest.raises(ValueError, match=r"unknown logical axes \['embd'\]"):
        shd.check_rules((("batch", "data"), ("embd", "fsdp")), ("data", "fsdp"))
    with pytest.raises(ValueError, match="no 'batch' rule"):
        shd.check_rules((("embed", "fsdp"),), ("data", "fsdp"))


STEP_SCRIPT = r"""
import json, jax, numpy as np
from jax.sharding import PartitionSpec as P
from configs import sd15
from jedi_jax.schedulers.schedule import NoiseScheduleConfig, make_schedule
from jedi_jax.train import models as models_lib, sharding as shd, state as state_lib, step as step_lib
from jedi_jax.train.data import make_loader

assert jax.device_count() == 8
cfg = sd15.get_config("micro")
rules = shd.DEFAULT_RULES
mesh8 = shd.make_mesh(("data", "fsdp"), (2, 4))
mesh1 = shd.make_mesh(("data", "fsdp"), (1, 1), devices=jax.devices()[:1])
tx, lr = state_lib.make_optimizer(cfg.train)
schedule = make_schedule(NoiseScheduleConfig(**cfg.schedule.to_dict()))
bundle = models_lib.build(cfg.model, mesh=mesh8, rules=rules, seed=0)
init = lambda k: state_lib.create_state(bundle.unet_init(k), tx, True)
batch = step_lib.select_batch(next(make_loader(cfg.data, tokenize_fn=bundle.tokenizer, seed=0,
                                               process_index=0, process_count=1)))
host_frozen = jax.device_get(bundle.frozen)
host_state = None
out = {}
for name, mesh in (("mesh8", mesh8), ("mesh1", mesh1)):
    abstract = jax.eval_shape(init, jax.random.key(0))
    sh = state_lib.state_shardings_for(abstract, tx, mesh, rules)
    if host_state is None:  # abstract-first sharded init on the 8-device mesh
        state = jax.jit(init, out_shardings=sh)(jax.random.key(0))
        host_state = jax.device_get(state)
    else:  # the same values on one device
        state = shd.put_global(host_state, sh)
    f_sh = {k: shd.param_shardings(v, mesh, rules) for k, v in host_frozen.items()}
    frozen = shd.put_global(host_frozen, f_sh)
    fn = step_lib.make_train_step(bundle.models, schedule, tx, lr, prediction_type="epsilon", ema_decay=0.9)
    compiled, info = step_lib.compile_train_step(
        fn, abstract_state=abstract, state_shardings=sh, abstract_batch=step_lib.abstract_batch(batch, 1),
        batch_sharding=shd.batch_sharding(mesh, rules), abstract_frozen=jax.eval_shape(lambda f: f, host_frozen),
        frozen_shardings=f_sh, mesh=mesh)
    gb = shd.global_batch(batch, shd.batch_sharding(mesh, rules))
    if name == "mesh8":
        specs = {
            "state.step": str(state.step.sharding.spec),
            "unet.conv_in": str(state.params["conv_in"]["kernel"].sharding.spec),
            "unet.conv_out": str(state.params["conv_out"]["kernel"].sharding.spec),
            "unet.time_linear_1": str(state.params["time_embedding"]["linear_1"]["kernel"].sharding.spec),
            "unet.conv_norm_out.scale": str(state.params["conv_norm_out"]["scale"].sharding.spec),
            "vae.decoder.conv_out": str(frozen["vae"]["decoder"]["conv_out"]["kernel"].sharding.spec),
            "text.token_embedding": str(frozen["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"].sharding.spec),
            "batch.images": str(gb["images"].sharding.spec),
        }
        # The rules must really split the parameters: bytes one device holds / bytes of all of them.
        leaves = jax.tree.leaves(state.params)
        share = sum(x.addressable_shards[0].data.nbytes for x in leaves) / sum(x.nbytes for x in leaves)
        adam = state.opt_state[1][0]  # chain(clip, adamw) -> adam's mu and nu mirror the params, as does EMA
        mirrors = lambda tree: all(a.sharding.spec == b.sharding.spec  # noqa: E731
                                   for a, b in zip(jax.tree.leaves(tree), leaves))
        out.update(specs=specs, param_share=share, mirrors={"mu": mirrors(adam.mu), "nu": mirrors(adam.nu),
                                                            "ema": mirrors(state.ema_params)}, flops8=info["flops"])
    new, metrics = compiled(state, gb, frozen, jax.device_put(jax.random.key_data(jax.random.key(1)), shd.replicated(mesh)))
    out[name] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                 "params": jax.device_get(new.params),
                 "ema": jax.device_get(new.ema_params), "step": int(new.step)}
    out[name + "_flops"] = info["flops"]
a, b = out["mesh8"], out["mesh1"]
diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))
ediff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a["ema"]), jax.tree.leaves(b["ema"])))
moved = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(host_state.params)))
print("RESULT", json.dumps({"loss8": a["loss"], "loss1": b["loss"], "param_diff": diff, "ema_diff": ediff,
                            "grad_norm": [a["grad_norm"], b["grad_norm"]],
                            "moved": moved, "steps": [a["step"], b["step"]], "specs": out["specs"],
                            "param_share": out["param_share"], "mirrors": out["mirrors"],
                            "flops": [out["mesh8_flops"], out["mesh1_flops"]]}))
"""


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    out = run_script(STEP_SCRIPT, devices=8)
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    print(res)
    assert res["steps"] == [1, 1]
    assert abs(res["loss8"] - res["loss1"]) <= 1e-5 * max(1.0, abs(res["loss1"])), res
    assert res["moved"] > 1e-4  # the step changed the params (lr 0 would make the check vacuous)
    assert res["param_diff"] < 1e-5 and res["ema_diff"] < 1e-5, res
    assert res["specs"] == {
        "state.step": str(P()),
        "unet.conv_in": str(P(None, None, None, "fsdp")),  # (3, 3, 9, 16): conv_out dim over fsdp
        "unet.conv_out": str(P(None, None, None, "fsdp")),  # (3, 3, 16, 4)
        "unet.time_linear_1": str(P("fsdp")),  # linear (16, 64): embed (in) dim over fsdp
        "unet.conv_norm_out.scale": str(P()),
        "vae.decoder.conv_out": str(P()),  # (3, 3, 8, 3): 3 % 4 != 0 -> replicated
        "text.token_embedding": str(P(None, "fsdp")),  # (vocab, embed)
        "batch.images": str(P(("data", "fsdp"))),
    }, res["specs"]
    assert res["mirrors"] == {"mu": True, "nu": True, "ema": True}, res["mirrors"]
    # fsdp=4 splits most parameter bytes 4 ways (norms, biases and odd-sized leaves stay whole):
    # a rule table that matched nothing would leave every device holding all of them (share 1.0)
    assert res["param_share"] < 0.4, res["param_share"]
    # Adam's update hardly moves when the whole gradient is scaled: compare the gradient itself
    assert abs(res["grad_norm"][0] - res["grad_norm"][1]) <= 1e-5 * res["grad_norm"][1], res["grad_norm"]
