#!/usr/bin/env bash
# JeDi training on SLURM GPU nodes: one task (process) per node driving all its GPUs; JAX's
# distributed runtime reads the SLURM environment (coordinator = first node). See launch/README.md.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh configs/sd15.py:h100x8 /ckpt/jedi_sd15 \
#       --config.model.pretrained=/ckpt/sd15-jax --config.data.source=array_record:/data/jedi_sets/1.0.0 \
#       --config.mesh.dcn_shape='(2,1)' --config.data.batch_size=128
#
# The mesh: mesh.shape is per node (8 GPUs: (1, 8) = FSDP within the node over NVLink) and
# mesh.dcn_shape across nodes ((nodes, 1) = data parallel over the network). data.batch_size is
# global. Re-submitting the same command resumes from the latest checkpoint in WORKDIR; on
# `scancel` / time limit SLURM sends SIGTERM (see --signal) and the trainer checkpoints and exits 0.
# Submit from the repo root: sbatch runs a spooled copy of this script, so the repo is taken to be
# $SLURM_SUBMIT_DIR (export REPO=/path/to/jedi_jax, or PYTHON=..., to submit from elsewhere).
#SBATCH --job-name=jedi
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
# Under sbatch, $0 is Slurm's spooled copy (.../slurmd/job<ID>/slurm_script), not this file: the repo
# is where sbatch was run from. Run directly (bash launch/gpu_slurm.sh / srun), it is this file's repo.
if [[ -n "${SLURM_SUBMIT_DIR:-}" ]]; then
  REPO=${REPO:-$SLURM_SUBMIT_DIR}
else
  REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
fi
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_slurm.sh: no python at $PYTHON (REPO=$REPO): run sbatch from the repo root, or export REPO or PYTHON" >&2
  exit 2
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Overlap FSDP all-gathers / reduce-scatters with compute (XLA GPU latency-hiding scheduler).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/xla_cache}

# One process per node; jax.distributed.initialize() auto-detects SLURM (coordinator, process ids).
srun --kill-on-bad-exit=1 --cpu-bind=none \
  "$PYTHON" -m jedi_jax.train --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@"
