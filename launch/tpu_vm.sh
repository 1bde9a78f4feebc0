#!/usr/bin/env bash
# JeDi training on a Cloud TPU VM slice: create (or reuse) the VM, install the repo on every worker,
# run the same command on all workers (jax.distributed auto-detects the slice). See launch/README.md.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra flags for jedi_jax.train ...]
#   launch/tpu_vm.sh jedi-v5e us-west4-a v5litepod-64 configs/sd15.py:v5e-64 /gcs/BUCKET/runs/sd15 \
#       --config.model.pretrained=/gcs/BUCKET/sd15-jax --config.data.source=array_record:/gcs/BUCKET/jedi_sets/1.0.0
#   (paths every worker sees, e.g. a bucket mounted with gcsfuse; the trainer refuses gs:// URLs)
#
# Environment: PROJECT (gcloud project; default: gcloud's), RUNTIME (TPU software version; default
# v2-alpha-tpuv5-lite), REPO_URL (git URL of this repo; default: copy the local checkout with scp),
# SPOT=1 (spot/preemptible VM: SIGTERM makes the trainer checkpoint and exit 0; re-run this script
# to resume from the latest checkpoint in WORKDIR).
set -euo pipefail

if [[ $# -lt 5 ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
NAME=$1; ZONE=$2; ACCEL=$3; CONFIG=$4; WORKDIR=$5; shift 5
EXTRA=("$@")
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=jedi_jax
here=$(cd "$(dirname "$0")/.." && pwd)

gcl() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT_FLAG:-}; }

# 1. Create the VM unless it exists (reuse keeps the installed environment).
if ! gcl describe "$NAME" >/dev/null 2>&1; then
  echo "creating TPU VM $NAME ($ACCEL, $RUNTIME) in $ZONE"
  gcl create "$NAME" --accelerator-type="$ACCEL" --version="$RUNTIME" ${SPOT:+--spot}
else
  echo "reusing TPU VM $NAME"
fi

# 2. Code on every worker: git clone/pull, or scp the local checkout (without .venv and runs).
if [[ -n "${REPO_URL:-}" ]]; then
  printf -v url_q '%q' "$REPO_URL"
  # a checkout is updated (a failed pull fails here, loudly); only a missing one is cloned
  gcl ssh "$NAME" --worker=all --command="if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR pull --ff-only; else git clone $url_q $REPO_DIR; fi"
else
  tarball=$(mktemp /tmp/jedi_jax.XXXX.tgz)
  tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf "$tarball" .
  gcl scp "$tarball" "$NAME:/tmp/jedi_jax.tgz" --worker=all
  gcl ssh "$NAME" --worker=all --command="mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf /tmp/jedi_jax.tgz"
  rm -f "$tarball"
fi

# 3. Install (idempotent): a venv with jax[tpu] and the package.
gcl ssh "$NAME" --worker=all --command="cd $REPO_DIR && \
  ( [ -x .venv/bin/python ] || python3 -m venv .venv ) && \
  .venv/bin/pip install -q -U pip && .venv/bin/pip install -q 'jax[tpu]' -e . "

# 4. Train on all workers at once. jax.distributed.initialize() finds the slice by itself
#    (TPU_WORKER_HOSTNAMES); logs of worker 0 are shown, the others log warnings only.
#    Every argument is %q-quoted for the remote shell (bash); with no extra flags none is passed
#    (printf '%q ' of an empty array would give one empty argument, which the trainer refuses).
#    pipefail makes the trainer's exit status, not tee's, the remote command's and so this script's.
printf -v config_q '%q' "$CONFIG"
printf -v workdir_q '%q' "$WORKDIR"
extra_q=""
if ((${#EXTRA[@]})); then printf -v extra_q ' %q' "${EXTRA[@]}"; fi
gcl ssh "$NAME" --worker=all --command="set -o pipefail; cd $REPO_DIR && \
  .venv/bin/python -m jedi_jax.train --config $config_q --workdir $workdir_q --distributed$extra_q 2>&1 | tee -a train.log"
