#!/usr/bin/env bash
# Train a JeDi-mini from scratch on one machine (stages 1-2), then evaluate it.
#
#   bash launch/train_mini.sh [cpu|gpu] [RUNS_DIR]
#
# The KL VAE (configs/mini_vae.py), then the joint-image UNet (configs/mini.py, from a random init)
# on the VAE's latents, then export to a model folder (RUNS_DIR/jedi_mini) and MiniBench. This is
# not the shipped model's recipe: the shipped UNet went through eleven stages (warm starts, caption
# wordings, loss weightings, text layers); jedi_jax/assets/jedi_mini/MODEL_CARD.md ("Exact
# commands") has that chain, the hardware and the times.
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
