#!/usr/bin/env bash
# Train a JeDi-mini from scratch on one machine (the VAE, then one UNet run), then evaluate it.
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
case "$variant" in
  cpu|gpu) ;;
  *) echo "train_mini.sh: variant must be cpu or gpu, got '$variant' (usage: bash launch/train_mini.sh [cpu|gpu] [RUNS_DIR])" >&2
     exit 2 ;;
esac
# the repository's .venv (make install) unless PYTHON says otherwise
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" && -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py=${PYTHON:-python}; fi
mkdir -p "$runs"

# A trainer stopped by SIGTERM / SIGHUP saves its step and exits 0 without finishing: stop here then
# (re-running this script resumes each stage where it stopped).
finished() {  # WORKDIR: its summary.json says the run reached its last step
  "$py" -c "import json, sys; sys.exit(json.load(open(sys.argv[1])).get('status', 'done') != 'done')" "$1/summary.json" \
    2>/dev/null || { echo "train_mini.sh: $1 did not finish (pre-empted?): re-run to resume" >&2; exit 1; }
}
$py -m jedi_jax.train.vae_trainer --config "configs/mini_vae.py:$variant" --workdir "$runs/mini_vae"
finished "$runs/mini_vae"
vae="$runs/mini_vae/vae_export"
$py -m jedi_jax.train --config "configs/mini.py:$variant" --workdir "$runs/mini" \
    --config.model.pretrained="$vae" --config.data.latent_vae="$vae" --config.data.pool_cache="$runs/mini_pool.npz"
finished "$runs/mini"
$py -m jedi_jax.train.export --workdir "$runs/mini" --dst "$runs/jedi_mini" --overwrite
$py -m jedi_jax.eval.minibench --model "$runs/jedi_mini" --out "$runs/minibench"
echo "model: $runs/jedi_mini (copy to jedi_jax/assets/jedi_mini to ship it); report: $runs/minibench/report.md"
