"""Entry point: `python -m soda_jax.main --config=configs/imagenet.py --workdir=DIR`.

Flags only; the run itself is `train.train_and_evaluate` so Colabs and tests call the same code.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (multi-host). Default: "
    "config.distributed, or the SODA_DISTRIBUTED=1 environment variable.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = config.distributed or os.environ.get("SODA_DISTRIBUTED") == "1"
  if distributed:
    jax.distributed.initialize()
  logging.info("JAX process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
               jax.local_device_count())
  from soda_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
