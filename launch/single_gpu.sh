#!/usr/bin/env bash
# One machine, all its local accelerators (no jax.distributed):
#   bash launch/single_gpu.sh [--dry_run] configs/cifar10.py /tmp/soda_cifar \
#       --config.data.tfds_data_dir=~/tfds
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi  # print the commands, run nothing
run() { if ((DRY_RUN)); then printf '%q ' "$@"; echo; else "$@"; fi; }
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
run python -m soda_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
