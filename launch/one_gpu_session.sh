#!/usr/bin/env bash
# Everything jedi_jax wants from ONE lent H100/H200 for a few minutes, in one command:
#
#   bash launch/one_gpu_session.sh OUT_DIR [TRAIN_SECONDS]
#
#   1. JeDi-mini (configs/mini.py:gpu) trains for TRAIN_SECONDS (default 360) of wall time, warm-
#      started from the shipped model (jedi_jax/assets/jedi_mini: its UNet, VAE, frozen CLIP and
#      tokenizer), then stops through SIGTERM (the trainer saves the step reached and exits);
#   2. meanwhile the SD 1.5 train-step benchmark (configs/sd15.py:h100x8 on one GPU, random
#      weights, 512 px, N=4, BENCH_SETS sets per GPU, cuDNN attention) compiles on the host CPUs,
#      and times its steps only once the GPU is free (--wait_for), so the figures are clean;
#   3. eval.learning_curve over every kept checkpoint (normalized identity, 16 subjects);
#   4. packs the last checkpoint (split in 15 MB parts) and the run's logs, metrics, samples and
#      curve into OUT_DIR.
# Afterwards, on any machine: cat OUT_DIR/ckpt.tar.part-* | tar -x -C runs/mini_gpu, then
#   python -m jedi_jax.train.export --workdir runs/mini_gpu --dst runs/jedi_mini_gpu
# Env overrides (the CPU dry run in tests/test_launch_scripts.py uses them): PYTHON, BENCH_CONFIG,
# BENCH_SETS, BENCH_ARGS, MINI_CONFIG, MINI_ARGS, CURVE_SUBJECTS, CURVE_SECONDS.
set -uo pipefail
out=${1:?usage: one_gpu_session.sh OUT_DIR [TRAIN_SECONDS]}
secs=${2:-360}
py=${PYTHON:-python3}
run=${RUN_DIR:-$(mktemp -d)/mini}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
flags=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$py" -c "import jax, flax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, jax.devices())"

( timeout --foreground -s TERM "$secs" "$py" -m jedi_jax.train --config "${MINI_CONFIG:-configs/mini.py:gpu}" --workdir "$run" \
    --config.model.pretrained=jedi_jax/assets/jedi_mini --config.data.latent_vae=jedi_jax/assets/jedi_mini \
    ${MINI_ARGS:-} >"$out/train.log" 2>&1
  echo "train exit $?" >>"$out/train.log"; touch "$flags/train.done" ) &
( timeout $((secs + 150)) "$py" -m jedi_jax.train.bench --config "${BENCH_CONFIG:-configs/sd15.py:h100x8}" \
    --config.model.pretrained= --config.mesh.shape="(1,-1)" --config.data.batch_size="${BENCH_SETS:-4}" \
    --steps 10 --out "$out/bench_sd15.json" --wait_for "$flags/train.done" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
  echo "bench exit $?" >>"$out/bench.log" ) &
wait
tail -n 3 "$out/train.log" "$out/bench.log"

timeout "${CURVE_SECONDS:-100}" "$py" -m jedi_jax.eval.learning_curve --workdir "$run" \
    --subjects "${CURVE_SUBJECTS:-16}" >"$out/curve.log" 2>&1
echo "curve exit $?" >>"$out/curve.log"
tail -n 4 "$out/curve.log"

last=$(ls "$run/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
[ -n "$last" ] && tar -C "$run" -cf - "checkpoints/$last" | split -b 15m - "$out/ckpt.tar.part-"
tar -C "$run" -czf "$out/run_logs.tgz" --ignore-failed-read metrics.jsonl summary.json samples \
    identity_curve.json identity_curve.png 2>/dev/null
ls -la "$out"
