#!/usr/bin/env bash
# Prepared accelerator check (GPU or TPU): train-step time, img/s, MFU, peak device memory and
# compile time of the imagenet and cifar10 configs in bfloat16, one JSON per run, plus encode /
# sample rows for imagenet. Needs the accelerator's jaxlib (e.g. `pip install "jax[cuda12]"` at
# the pinned version) and runs in a few minutes on one H100/H200:
#
#   bash launch/accelerator_check.sh OUT_DIR [--dry_run]
#
# Per-chip batches (BATCH_IMAGENET, BATCH_CIFAR; global = per-chip x local devices) default to
# sizes that fit one 80 GB chip in bf16; the synthetic batch excludes the input pipeline.
set -euo pipefail
OUT=${1:?output directory}; DRY=${2:-}
N=$(python -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 1)
BI=$(( ${BATCH_IMAGENET:-64} * N )); BC=$(( ${BATCH_CIFAR:-256} * N ))
runs=(
  "imagenet_bf16_train --config=configs/imagenet.py --config.batch_size=$BI --config.distributed=False --mode=train --steps=10 --warmup=3"
  "imagenet_bf16_encode_sample --config=configs/imagenet.py --config.batch_size=$BI --config.distributed=False --mode=encode --steps=10 --warmup=3"
  "cifar10_bf16_train --config=configs/cifar10.py --config.batch_size=$BC --mode=train --steps=20 --warmup=3"
  "cifar10_peer_bf16_train --config=configs/cifar10.py:arch=peer --config.batch_size=$BC --mode=train --steps=20 --warmup=3"
)
mkdir -p "$OUT"
for r in "${runs[@]}"; do
  name=${r%% *}; args=${r#* }
  cmd="python -m soda_jax.tools.benchmark $args --json=$OUT/$name.json"
  echo "$cmd"
  if [ "$DRY" != "--dry_run" ]; then
    $cmd 2>&1 | tail -n 6 | tee "$OUT/$name.txt"
  fi
done
