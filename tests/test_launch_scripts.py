"""The launch scripts: each parses, prints its usage when called without arguments, and the one-GPU
session script runs end to end on this CPU (tiny settings through its environment overrides).

A lent GPU gives a session one short try, so ``launch/one_gpu_session.sh`` must work the first
time: the dry run below goes through every stage it has (time-boxed JeDi-mini training stopped by
SIGTERM, the SD-layout train-step benchmark waiting for the GPU to be free, the learning curve,
the packed checkpoint) and then does what its header says to do afterwards on any machine: unpack
the checkpoint parts and export a model folder that loads.

The other tests run the scripts against stubs (a fake ``python``, ``gcloud``, ``srun``; no jax), in a
second or two each: exit statuses, the arguments the trainer receives, which python is started.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.slow
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
               CURVE_SUBJECTS="2", CURVE_SECONDS="240", CURVE_ARGS="--sampling-steps 4")
    # The time box ends early: start-up (pool render + encode, compiling beside the bench) takes ~32 s
    # on idle cores and ~90 s beside the rest of the suite, so a fixed box long enough for the first
    # checkpoint under load (150 s) mostly waited. Once a checkpoint of step >= 3 is written, the test
    # sends the box's `timeout` SIGALRM, its own expiry signal: timeout then does exactly what it does
    # when the time is up (SIGTERM to the trainer, whose own exit status it returns:
    # --preserve-status), the path a GPU session takes. The 600 s
    # box stays as the backstop.
    proc = subprocess.Popen(["bash", str(LAUNCH / "one_gpu_session.sh"), str(out), "600"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        expired = _expire_time_box_after_checkpoint(proc, run, step=3, limit_s=600)
        stdout, _ = proc.communicate(timeout=900)
    finally:  # on any failure above, nothing of the session (trainer, bench, curve) outlives the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")
    logs = {p.name: p.read_text() for p in out.glob("*.log")}
    why = res.stdout[-2000:] + "".join(f"\n--- {k}\n{v[-2000:]}" for k, v in logs.items())
    assert res.returncode == 0, why
    assert expired, "no checkpoint of step >= 3 within the box: " + why
    assert "train exit 0" in logs["train.log"], why  # the trainer's own status (timeout --preserve-status)

    # 1. Training ran until the time box's SIGTERM and saved the step it reached.
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3, why
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["step"] == steps[-1], why
    assert f"pre-empted: checkpoint of step {steps[-1]} written" in logs["train.log"], why
    # 2. The benchmark timed its steps only after training was done, and wrote its figures.
    assert "bench exit 0" in logs["bench.log"] and "waiting for" in logs["bench.log"], why
    bench = json.loads((out / "bench_sd15.json").read_text())
    assert bench["sets_per_s"] > 0 and (bench["set_size"], bench["image_size"]) == (3, 16)
    # 3. The learning curve scored every kept checkpoint.
    assert "curve exit 0" in logs["curve.log"], why
    curve = json.loads((run / "identity_curve.json").read_text())
    assert [c["step"] for c in curve] == steps and all(np.isfinite(c["normalized"]) for c in curve)
    assert all(c["steps"] == 4 for c in curve), curve  # CURVE_ARGS reached it
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


def _expire_time_box_after_checkpoint(proc, run, *, step, limit_s):
    """Waits for a finished checkpoint of `step` or later under `run`, then sends SIGALRM to the
    `timeout --foreground` process that boxes the trainer (found by its command line: that flag and
    the run folder). True when it was sent; False when the script ended or limit_s passed first."""
    deadline = time.time() + limit_s
    while time.time() < deadline and proc.poll() is None:
        ckpts = run / "checkpoints"
        done = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if done and max(done) >= step:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    argv = cmdline.read_bytes().split(b"\0")
                except OSError:  # the process ended while we looked
                    continue
                if argv[0].endswith(b"timeout") and b"--foreground" in argv and str(run).encode() in argv:
                    try:
                        os.kill(int(cmdline.parent.name), signal.SIGALRM)
                    except ProcessLookupError:  # it ended between the read and the kill
                        continue
                    return True
        time.sleep(1)
    return False


# --- The scripts against stubs: fast, no jax. ------------------------------------------------------

def _stub(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _clean_env(**extra):
    drop = {"PYTHON", "REPO", "RUN_DIR", "PROJECT", "REPO_URL", "SPOT", "MINI_CONFIG", "MINI_ARGS", "BENCH_CONFIG",
            "BENCH_SETS", "BENCH_ARGS", "CURVE_SUBJECTS", "CURVE_SECONDS", "CURVE_ARGS", "CDPATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(extra)
    return env


# A stand-in for python as one_gpu_session.sh calls it: it logs each part's working directory, the
# "trainer" writes a checkpoint and then fails (STUB_TRAIN=fail), exits (=done), fails on the time
# box's SIGTERM (=save_fails) or waits for it and exits 0 the way the real trainer does (default); bench and curve exit
# STUB_BENCH_RC / STUB_CURVE_RC.
SESSION_PYTHON = r"""
case "$1 $2" in
  "-m jedi_jax.train")
    echo "train $PWD" >>"$STUB_LOG"
    while [ $# -gt 0 ]; do [ "$1" = --workdir ] && wd=$2; shift; done
    mkdir -p "$wd/checkpoints/3" && echo weights >"$wd/checkpoints/3/state" && echo '{"step": 3}' >"$wd/metrics.jsonl"
    case "${STUB_TRAIN:-sigterm}" in fail) exit 1;; done) exit 0;;
      save_fails) trap 'kill $! 2>/dev/null; echo "the save on SIGTERM failed"; exit 3' TERM; sleep 30 & wait; exit 0;;
    esac
    trap 'kill $! 2>/dev/null; echo "saved on SIGTERM"; exit 0' TERM
    sleep 30 & wait; exit 0;;
  "-m jedi_jax.train.bench") echo "bench $PWD" >>"$STUB_LOG"; exit "${STUB_BENCH_RC:-0}";;
  "-m jedi_jax.eval.learning_curve") echo "curve $PWD" >>"$STUB_LOG"; exit "${STUB_CURVE_RC:-0}";;
  *) exit 0;;
esac
"""


def _run_session(tmp_path, **env):
    _stub(tmp_path / "bin" / "python", SESSION_PYTHON)
    env = _clean_env(STUB_LOG=str(tmp_path / "stub.log"), RUN_DIR="run", **env)
    env.setdefault("PYTHON", "bin/python")  # relative: to the caller's directory, like OUT_DIR and RUN_DIR
    # Called from tmp_path, not the repo root, with relative OUT_DIR / RUN_DIR / PYTHON; a 1 s time box.
    return subprocess.run(["bash", str(LAUNCH / "one_gpu_session.sh"), "out", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def _failed_parts(stdout):
    last = stdout.strip().splitlines()[-1]
    assert "FAILED" in last, stdout[-2000:]
    return dict(re.findall(r"(\w+) \(exit (\d+)\)", last))


def test_one_gpu_session_fails_when_no_part_can_run(tmp_path):
    res = _run_session(tmp_path, PYTHON="false")
    assert res.returncode != 0, res.stdout[-2000:]
    assert _failed_parts(res.stdout) == {"train": "1", "bench": "1", "curve": "1"}
    assert (tmp_path / "out" / "train.log").exists()  # OUT_DIR relative to the caller's directory


def test_one_gpu_session_runs_from_the_repo_root_and_accepts_the_planned_sigterm(tmp_path):
    res = _run_session(tmp_path)
    why = res.stdout[-2000:] + res.stderr[-2000:]
    assert res.returncode == 0, why
    out = tmp_path / "out"
    assert "train exit 0" in (out / "train.log").read_text() and "saved on SIGTERM" in (out / "train.log").read_text()
    # Every part ran in the repo root (the default config / asset paths are repo-relative) ...
    ran = sorted((tmp_path / "stub.log").read_text().splitlines())  # train and bench run side by side
    assert ran == [f"{part} {REPO}" for part in ("bench", "curve", "train")], ran
    # ... while OUT_DIR and RUN_DIR stayed relative to the caller's directory.
    assert list(out.glob("ckpt.tar.part-*")) and (out / "run_logs.tgz").exists()
    assert (tmp_path / "run" / "checkpoints" / "3" / "state").exists()


@pytest.mark.parametrize("part, env, code", [("train", {"STUB_TRAIN": "fail"}, "1"),
                                             ("train", {"STUB_TRAIN": "save_fails"}, "3"),  # after the box's SIGTERM
                                             ("bench", {"STUB_BENCH_RC": "3"}, "3"),
                                             ("curve", {"STUB_CURVE_RC": "2"}, "2")])
def test_one_gpu_session_exits_nonzero_naming_the_failed_part_after_packing(tmp_path, part, env, code):
    res = _run_session(tmp_path, **env)
    assert res.returncode != 0, res.stdout[-2000:]
    assert _failed_parts(res.stdout) == {part: code}
    out = tmp_path / "out"
    assert list(out.glob("ckpt.tar.part-*")) and (out / "run_logs.tgz").exists()  # packed all the same
    assert "ckpt.tar.part-aa" in res.stdout  # and the summary (ls of OUT_DIR) printed


# A stand-in for gcloud: "gcloud compute tpus tpu-vm SUB NAME ...": describe says the VM exists; every
# call is logged; of the ssh commands only the training one is run (in $FAKE_HOME, as the worker's
# home), the code copy and install ones are only logged.
GCLOUD = r"""
echo "$*" >>"$FAKE_HOME/gcloud.log"
case "$4" in
  ssh) for a in "$@"; do case "$a" in --command=*) cmd=${a#--command=};; esac; done
       case "$cmd" in *"-m jedi_jax.train"*) cd "$FAKE_HOME" && exec bash -c "$cmd";; esac;;
esac
exit 0
"""
# The worker's venv python: records its arguments (NUL-separated), prints a line, exits $TRAIN_RC.
WORKER_PYTHON = r"""
printf '%s\0' "$@" >"$FAKE_HOME/argv"
echo "trainer says hello"
exit "${TRAIN_RC:-0}"
"""


def _run_tpu_vm(tmp_path, extra, **env):
    home = tmp_path / "home"
    _stub(tmp_path / "bin" / "gcloud", GCLOUD)
    _stub(home / "jedi_jax" / ".venv" / "bin" / "python", WORKER_PYTHON)
    env = _clean_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_HOME=str(home),
                     REPO_URL="https://example.invalid/jedi_jax.git", **env)
    workdir = str(tmp_path / "runs" / "sd15 try 1")  # a space: the remote command string must quote it
    res = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "vm", "zone", "v5litepod-8", "configs/sd15.py:tiny",
                          workdir, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    argv = (home / "argv").read_text().split("\0")[:-1] if (home / "argv").exists() else None
    return res, argv, workdir, home


@pytest.mark.parametrize("extra", [[], ["--config.mesh.dcn_shape=(2, 1)", "--config.data.source=array_record:/d/s"]])
def test_tpu_vm_passes_the_trainer_exactly_its_arguments(tmp_path, extra):
    res, argv, workdir, home = _run_tpu_vm(tmp_path, extra)
    assert res.returncode == 0, res.stdout + res.stderr
    # No empty argument when there are no extra flags; a space in WORKDIR or a flag stays in its argument.
    assert argv == ["-m", "jedi_jax.train", "--config", "configs/sd15.py:tiny", "--workdir", workdir,
                    "--distributed", *extra]
    assert "trainer says hello" in (home / "jedi_jax" / "train.log").read_text()


def test_tpu_vm_exits_nonzero_when_the_trainer_fails(tmp_path):
    res, argv, _, home = _run_tpu_vm(tmp_path, ["--config.train.steps=1"], TRAIN_RC="3")
    assert argv is not None  # the trainer did run, and failed
    assert res.returncode != 0, res.stdout + res.stderr  # not tee's 0
    assert "trainer says hello" in (home / "jedi_jax" / "train.log").read_text()


def _run_spooled_gpu_slurm(tmp_path, submit_dir):
    # sbatch runs a copy of the script from slurmd's spool directory, in the directory sbatch was run from.
    script = tmp_path / "spool" / "job42" / "slurm_script"
    script.parent.mkdir(parents=True)
    script.write_text((LAUNCH / "gpu_slurm.sh").read_text())
    _stub(tmp_path / "bin" / "srun", 'printf "%s\\n" "$@" >"$SRUN_ARGV"\n')
    env = _clean_env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SRUN_ARGV=str(tmp_path / "srun_argv"),
                     SLURM_SUBMIT_DIR=str(submit_dir), SLURM_JOB_ID="42")
    res = subprocess.run(["bash", str(script), "configs/sd15.py:h100x8", "/ckpt/run", "--config.train.steps=1"],
                         cwd=submit_dir, env=env, capture_output=True, text=True, timeout=60)
    argv = (tmp_path / "srun_argv").read_text().splitlines() if (tmp_path / "srun_argv").exists() else None
    return res, argv


def test_gpu_slurm_under_sbatch_uses_the_submit_dirs_python(tmp_path):
    checkout = tmp_path / "checkout"  # the repo sbatch was run from, with its venv
    python = _stub(checkout / ".venv" / "bin" / "python", "exit 0\n")
    res, argv = _run_spooled_gpu_slurm(tmp_path, checkout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert argv == ["--kill-on-bad-exit=1", "--cpu-bind=none", str(python), "-m", "jedi_jax.train",
                    "--config", "configs/sd15.py:h100x8", "--workdir", "/ckpt/run", "--distributed",
                    "--config.train.steps=1"]


def test_gpu_slurm_stops_before_srun_when_the_python_is_missing(tmp_path):
    elsewhere = tmp_path / "elsewhere"  # sbatch run from outside the repo, REPO not exported
    elsewhere.mkdir()
    res, argv = _run_spooled_gpu_slurm(tmp_path, elsewhere)
    assert res.returncode == 2 and argv is None, res.stdout + res.stderr
    assert "repo root" in res.stderr and str(elsewhere / ".venv" / "bin" / "python") in res.stderr


def _fake_repo_train_mini(tmp_path):
    """launch/train_mini.sh copied into a fake checkout whose .venv python logs its arguments and fails
    (so the script stops at its first command)."""
    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    script = checkout / "launch" / "train_mini.sh"
    script.write_text((LAUNCH / "train_mini.sh").read_text())
    _stub(checkout / ".venv" / "bin" / "python", f'echo "$0 $*" >> {tmp_path / "argv"}\nexit 3\n')
    return checkout, script


def test_train_mini_refuses_an_unknown_variant_before_running_anything(tmp_path):
    checkout, script = _fake_repo_train_mini(tmp_path)
    res = subprocess.run(["bash", str(script), "tiny"], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "variant must be cpu or gpu, got 'tiny'" in res.stderr, res.stderr
    assert not (tmp_path / "argv").exists()  # no stage started (configs/mini_vae.py has a :tiny, mini.py not)


def test_train_mini_runs_the_checkouts_venv_python_unless_PYTHON_is_set(tmp_path):
    checkout, script = _fake_repo_train_mini(tmp_path)
    res = subprocess.run(["bash", str(script), "gpu", str(tmp_path / "runs")], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr  # the stub's failure stops the script (set -e)
    venv_python = checkout / ".venv" / "bin" / "python"
    assert (tmp_path / "argv").read_text().split() == [
        str(venv_python), "-m", "jedi_jax.train.vae_trainer", "--config", "configs/mini_vae.py:gpu",
        "--workdir", str(tmp_path / "runs" / "mini_vae")]
    other = _stub(tmp_path / "bin" / "mypython", f'echo "$0 $*" > {tmp_path / "argv"}\nexit 3\n')
    subprocess.run(["bash", str(script), "cpu"], cwd=tmp_path, env=_clean_env(PYTHON=str(other)),
                   capture_output=True, text=True, timeout=60)
    assert (tmp_path / "argv").read_text().split()[0] == str(other)
