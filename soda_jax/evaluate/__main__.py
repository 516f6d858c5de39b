"""Evaluate a workdir's newest checkpoint: linear probe + k-NN on h and z, reconstruction PSNR;
for a multi-view (3-D) config, novel view synthesis instead (evaluate/nvs.py).

python -m soda_jax.evaluate --config=configs/demo.py --workdir=/tmp/soda_demo [--step=N]
python -m soda_jax.evaluate --config=configs/nvs_synthetic.py --workdir=/tmp/soda_nvs \
    --config.diffusion.w_p=2 --out=/tmp/soda_nvs/eval_wp2

NVS writes nvs_eval.json and the turntable under --out (default WORKDIR/evaluate), so sampler
settings can be compared without retraining and without overwriting the run's own evaluation.

Without --step the newest *intact* checkpoint is used (damaged ones are skipped with a warning);
an explicit --step that is damaged, missing or from another config is a one-message error.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest intact).")
_OUT = flags.DEFINE_string("out", None, "Multi-view configs: where nvs_eval.json and the "
                           "turntable go (default: WORKDIR/evaluate).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from soda_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.prepare_cpu(_CONFIG.value)
  import jax  # pylint: disable=g-import-not-at-top
  from soda_jax import checkpointing, config_checks, sharding, train_step as ts  # pylint: disable=g-import-not-at-top
  from soda_jax.data import sources  # pylint: disable=g-import-not-at-top
  from soda_jax.evaluate import nvs, representation  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    config_checks.check(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(config)
    model, tx = ts.build_model(config), ts.make_optimizer(config)
    abstract, _, _ = ts.abstract_state(model, tx, config, mesh, jax.random.PRNGKey(0))
    ckpt = checkpointing.Checkpointer(_WORKDIR.value, async_save=False)
    if _STEP.value is not None:
      step, state = _STEP.value, ckpt.restore(_STEP.value, abstract, config=config)
    else:
      step, state = ckpt.restore_latest(abstract, config=config)
    ckpt.close()
  except (config_checks.ConfigError, checkpointing.CheckpointError) as e:
    sys.exit(f"Error: {e}")
  if state is None:
    sys.exit(f"Error: no checkpoint in {ckpt.directory}")
  if sources.is_multiview(config.data):
    if config.evals.nvs_objects <= 0:
      sys.exit(f"Error: config.evals.nvs_objects={config.evals.nvs_objects}: nothing to "
               "evaluate for a multi-view config (set it > 0)")
    out = _OUT.value or os.path.join(_WORKDIR.value, "evaluate")
    nvs.evaluate(config, model, state.eval_variables(), out, step, mesh=mesh)  # prints its table
    return
  results = representation.evaluate(config, model, state, mesh)
  print(f"Checkpoint step {step} ({config.data.name}):\n" + representation.format_table(results))


if __name__ == "__main__":
  app.run(main)
