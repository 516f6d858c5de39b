#!/usr/bin/env bash
# N processes of soda_jax.main on this one machine, joined by jax.distributed into one mesh: the
# multi-host code path (process-sharded input, cross-process collectives over gloo, coordinated
# preemption, process-0-only files) exercised on a laptop or in CI.
#
#   bash launch/local_multiprocess.sh 2 configs/tiny.py --workdir=/tmp/soda_mp [--config.x=y ...]
#
# Each process gets SODA_LOCAL_DEVICES (default 4) CPU devices, so 2 processes form an 8-device
# mesh (e.g. --config.mesh.shape='(2,4)'); other XLA_FLAGS of the caller are kept.
# Coordinator: 127.0.0.1 on a free port. With SODA_LOG_DIR set, process i logs to
# $SODA_LOG_DIR/process_i.log. Prints one line "local_multiprocess: process i pid P" per process. If any process fails, the others are
# killed (they cannot go on without it); the exit code is the first failure's, else 0.
# --dry_run prints the commands instead of running them.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
N=${1:?number of processes}; CONFIG=${2:?config file}; shift 2
PYTHON=${PYTHON:-python}
DEVICES=${SODA_LOCAL_DEVICES:-4}
PORT=${SODA_COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < N; i++)); do
  cmd=(env JAX_PLATFORMS=cpu
       XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
       "$PYTHON" -m soda_jax.main --config="$CONFIG" --coordinator_address="127.0.0.1:$PORT"
       --num_processes="$N" --process_id="$i" "$@")
  if ((DRY_RUN)); then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  if [[ -n "${SODA_LOG_DIR:-}" ]]; then
    mkdir -p "$SODA_LOG_DIR"
    "${cmd[@]}" > "$SODA_LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
  echo "local_multiprocess: process $i pid $!"
done
((DRY_RUN)) && exit 0
# A SIGTERM/SIGINT to the launcher reaches every process (each then saves and exits at the step
# they agree on), instead of leaving them running without it.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

status=0
for ((k = 0; k < N; k++)); do
  rc=0
  wait -n "${pids[@]}" || rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
