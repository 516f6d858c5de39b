#!/usr/bin/env bash
# Run SODA on a Cloud TPU VM pod slice: every worker runs the same command; JAX forms one mesh
# across all hosts after jax.distributed.initialize() (enabled by SODA_DISTRIBUTED=1).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/soda_r50 \
#   TFDS_DIR=gs://my-bucket/tfds bash launch/tpu_pod.sh [--dry_run] configs/imagenet.py \
#       [--config.x=y ...]
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi  # print the commands, run nothing
run() { if ((DRY_RUN)); then printf '%q ' "$@"; echo; else "$@"; fi; }
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${TFDS_DIR:?set TFDS_DIR}"
CONFIG=${1:?config file}; shift
REPO=${REPO:?set REPO to the git URL of this repository}
EXTRA="$*"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  test -d soda_jax || git clone $REPO soda_jax
  cd soda_jax && git pull -q
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  SODA_DISTRIBUTED=1 python -m soda_jax.main --config=$CONFIG --workdir=$WORKDIR \
      --config.data.tfds_data_dir=$TFDS_DIR $EXTRA"
