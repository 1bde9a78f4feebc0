#!/usr/bin/env bash
# Train the embedded default JeDi-mini from scratch on one machine, then evaluate it.
#
#   bash launch/train_mini.sh [cpu|gpu] [RUNS_DIR]
#
# Stage 1: the KL VAE (configs/mini_vae.py), stage 2: the joint-image UNet (configs/mini.py) on
# the stage-1 latents, then export to a model folder and MiniBench. The shipped model was made
# with exactly these commands; its MODEL_CARD.md says which variant, on what hardware, how long.
set -euo pipefail
variant=${1:-cpu}
runs=${2:-runs}
py=${PYTHON:-python}
mkdir -p "$runs"

$py -m jedi_jax.train.vae_trainer --config "configs/mini_vae.py:$variant" --workdir "$runs/mini_vae"
vae="$runs/mini_vae/vae_export"
$py -m jedi_jax.train --config "configs/mini.py:$variant" --workdir "$runs/mini" \
    --config.model.pretrained="$vae" --config.data.latent_vae="$vae" --config.data.pool_cache="$runs/mini_pool.npz"
$py -m jedi_jax.train.export --workdir "$runs/mini" --dst "$runs/jedi_mini" --overwrite
$py -m jedi_jax.eval.minibench --model "$runs/jedi_mini" --out "$runs/minibench"
echo "model: $runs/jedi_mini (copy to jedi_jax/assets/jedi_mini to ship it); report: $runs/minibench/report.md"
