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
# Everything that lands in the remote shell command is quoted for it (%q): an argument such as
# --config.mesh.shape='(8,4)' must reach every worker as one word, not as bash syntax.
q() { printf '%q' "$1"; }
EXTRA=$(if (($#)); then printf ' %q' "$@"; fi)
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  test -d soda_jax || git clone $(q "$REPO") soda_jax
  cd soda_jax && git pull -q
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  SODA_DISTRIBUTED=1 python -m soda_jax.main --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") \
      --config.data.tfds_data_dir=$(q "$TFDS_DIR")$EXTRA"
