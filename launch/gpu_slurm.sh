#!/usr/bin/env bash
# SLURM (one task per node, all GPUs of the node visible to it). jax.distributed.initialize()
# reads the SLURM environment, so no coordinator address is needed.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 launch/gpu_slurm.sh \
#       configs/imagenet.py /shared/runs/soda_r50 /shared/tfds
# (`bash launch/gpu_slurm.sh --dry_run CONFIG WORKDIR TFDS_DIR` prints the commands.)
#SBATCH --job-name=soda
#SBATCH --exclusive
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi  # print the commands, run nothing
run() { if ((DRY_RUN)); then printf '%q ' "$@"; echo; else "$@"; fi; }
CONFIG=${1:?config}; WORKDIR=${2:?workdir}; TFDS_DIR=${3:?tfds data dir}; shift 3
# requirements.txt pins the CPU jaxlib; on GPU nodes install the CUDA plugin of the same version:
#   pip install -r requirements.txt "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
((DRY_RUN)) && echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
run srun python -m soda_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed \
    --config.data.tfds_data_dir="$TFDS_DIR" "$@"
