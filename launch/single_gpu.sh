#!/usr/bin/env bash
# One machine, all its local accelerators (no jax.distributed):
#   bash launch/single_gpu.sh configs/cifar10.py /tmp/soda_cifar --config.data.tfds_data_dir=~/tfds
set -euo pipefail
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; shift 2
python -m soda_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
