#!/usr/bin/env bash
# Everything jedi_jax wants from ONE lent H100/H200 for a few minutes, in one command:
#
#   bash launch/one_gpu_session.sh OUT_DIR [TRAIN_SECONDS]
#
#   1. JeDi-mini (configs/mini.py:gpu) trains for TRAIN_SECONDS (default 360) of wall time, warm-
#      started from the shipped model (jedi_jax/assets/jedi_mini: its UNet, VAE, frozen CLIP and
#      tokenizer), then stops through SIGTERM (the trainer saves the step reached and exits);
#      MINI_ARGS come after the warm-start flags, so a repeated --config.model.pretrained /
#      --config.data.latent_vae there wins (the model card's stage 2 starts from stage 1 that way);
#   2. meanwhile the SD 1.5 train-step benchmark (configs/sd15.py:h100x8 on one GPU, random
#      weights, 512 px, N=4, BENCH_SETS sets per GPU, cuDNN attention) compiles on the host CPUs,
#      and times its steps only once the GPU is free (--wait_for), so the figures are clean;
#   3. eval.learning_curve over every kept checkpoint (normalized identity, 16 subjects);
#   4. packs the last checkpoint (split in 15 MB parts) and the run's logs, metrics, samples and
#      curve into OUT_DIR.
# Afterwards, on any machine: mkdir -p runs/mini_gpu && cat OUT_DIR/ckpt.tar.part-* | tar -x -C runs/mini_gpu,
#   then python -m jedi_jax.train.export --workdir runs/mini_gpu --dst runs/jedi_mini_gpu
# Env overrides (the CPU dry run in tests/test_launch_scripts.py uses them): PYTHON, BENCH_CONFIG,
# BENCH_SETS, BENCH_ARGS, MINI_CONFIG, MINI_ARGS, CURVE_SUBJECTS, CURVE_SECONDS, CURVE_ARGS, RUN_DIR.
# It runs from the repo root whatever the caller's directory (config and asset paths are repo-
# relative; OUT_DIR, RUN_DIR and a PYTHON path stay relative to the caller's directory). Exit status:
# 0 when training exited 0 (ended by itself, or saved after the planned SIGTERM), and the bench and
# the curve exited 0;
# otherwise 1, after packing whatever exists, with a last line naming the parts that failed.
set -uo pipefail
out=${1:?usage: one_gpu_session.sh OUT_DIR [TRAIN_SECONDS]}
secs=${2:-360}
abspath() { case $1 in /*) printf '%s\n' "$1";; *) printf '%s\n' "$PWD/$1";; esac; }
py=${PYTHON:-python3}
case $py in */*) py=$(abspath "$py");; esac  # a path (not a command name) stays the caller's
run=$(abspath "${RUN_DIR:-$(mktemp -d)/mini}")
mkdir -p "$out" || exit 1
out=$(CDPATH= cd -- "$out" && pwd) || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
flags=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, jax.devices())"

# At the planned SIGTERM the trainer saves the step reached and exits 0. --preserve-status: the
# trainer's own exit status, not timeout's 124, so a failed pre-emption save is a failure; -k: a
# trainer still running 120 s after the SIGTERM is killed (SIGKILL, exit 137) instead of holding the GPU.
( timeout --foreground --preserve-status -k 120 -s TERM "$secs" "$py" -m jedi_jax.train --config "${MINI_CONFIG:-configs/mini.py:gpu}" --workdir "$run" \
    --config.model.pretrained=jedi_jax/assets/jedi_mini --config.data.latent_vae=jedi_jax/assets/jedi_mini \
    ${MINI_ARGS:-} >"$out/train.log" 2>&1
  rc=$?; echo "train exit $rc" >>"$out/train.log"; touch "$flags/train.done"; exit $rc ) &
train_pid=$!
( timeout $((secs + 150)) "$py" -m jedi_jax.train.bench --config "${BENCH_CONFIG:-configs/sd15.py:h100x8}" \
    --config.model.pretrained= --config.mesh.shape="(1,-1)" --config.data.batch_size="${BENCH_SETS:-4}" \
    --steps 10 --out "$out/bench_sd15.json" --wait_for "$flags/train.done" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
  rc=$?; echo "bench exit $rc" >>"$out/bench.log"; exit $rc ) &
bench_pid=$!
wait "$train_pid"; train_rc=$?
wait "$bench_pid"; bench_rc=$?
tail -n 3 "$out/train.log" "$out/bench.log"

timeout "${CURVE_SECONDS:-100}" "$py" -m jedi_jax.eval.learning_curve --workdir "$run" \
    --subjects "${CURVE_SUBJECTS:-16}" ${CURVE_ARGS:-} >"$out/curve.log" 2>&1
curve_rc=$?
echo "curve exit $curve_rc" >>"$out/curve.log"
tail -n 4 "$out/curve.log"

last=$(ls "$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
[ -n "$last" ] && tar -C "$run" -cf - "checkpoints/$last" | split -b 15m - "$out/ckpt.tar.part-"
tar -C "$run" -czf "$out/run_logs.tgz" --ignore-failed-read metrics.jsonl summary.json samples \
    identity_curve.json identity_curve.png 2>/dev/null
ls -la "$out"

failed=()
[[ $train_rc == 0 ]] || failed+=("train (exit $train_rc)")
[[ $bench_rc == 0 ]] || failed+=("bench (exit $bench_rc)")
[[ $curve_rc == 0 ]] || failed+=("curve (exit $curve_rc)")
if ((${#failed[@]})); then
  printf -v list '%s, ' "${failed[@]}"
  echo "one_gpu_session.sh: FAILED: ${list%, } (logs in $out)"
  exit 1
fi
echo "one_gpu_session.sh: all parts OK (train exit $train_rc, bench exit 0, curve exit 0)"
