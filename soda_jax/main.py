"""Entry point: `python -m soda_jax.main --config=configs/imagenet.py --workdir=DIR`.

Flags only; the run itself is `train.train_and_evaluate` so Colabs and tests call the same code.
An invalid config or an unusable checkpoint ends the program with its one message (exit code 1),
not a traceback.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (multi-host). Default: "
    "config.distributed, or the SODA_DISTRIBUTED=1 environment variable.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (only where JAX cannot detect the "
    "cluster, e.g. launch/local_multiprocess.sh); implies --distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def _distributed(config) -> bool:
  """Asked for by the flag, the config or the environment."""
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  return (config.distributed or os.environ.get("SODA_DISTRIBUTED") == "1"
          or _COORDINATOR.value is not None)


def initialize_distributed(config) -> None:
  """jax.distributed.initialize() when asked (flag, config or env), else nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  if not _distributed(config):
    return
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  else:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not _distributed(config):  # multi-process launches choose their own device counts
    from soda_jax import cpu_devices  # pylint: disable=g-import-not-at-top
    cpu_devices.prepare_cpu(config)
  import jax  # pylint: disable=g-import-not-at-top
  initialize_distributed(config)
  logging.info("JAX process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
               jax.local_device_count())
  from soda_jax import checkpointing, config_checks, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (config_checks.ConfigError, checkpointing.CheckpointError) as e:
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  app.run(main)
