"""Export a workdir's checkpoint to other frameworks (formats: see `soda_jax.export`).

python -m soda_jax.export --config=configs/demo.py --workdir=/tmp/soda_demo [--step=N] \
    --to=torchvision,safetensors,stablehlo,saved_model,onnx --out=/tmp/soda_export [--online]

EMA params by default (`--online`: the raw ones), with the checkpoint's BatchNorm statistics.
Bad input (a format, a step, a v2 encoder for torchvision) fails with one line before anything
compiles, exit code 2.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from soda_jax import export

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_TO = flags.DEFINE_list("to", None, f"Formats, comma-separated: {', '.join(export.FORMATS)}.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_ONLINE = flags.DEFINE_bool("online", False, "Export the online params instead of the EMA ones.")
_PLATFORMS = flags.DEFINE_list("platforms", list(export.PLATFORMS),
                               "Platforms to lower stablehlo / saved_model for.")
flags.mark_flags_as_required(["config", "workdir", "to", "out"])


def main(argv):
  del argv
  try:
    paths = export.export_checkpoint(_CONFIG.value, _WORKDIR.value, _TO.value, _OUT.value,
                                     step=_STEP.value, online=_ONLINE.value,
                                     platforms=_PLATFORMS.value)
  except ValueError as e:
    print(f"soda_jax.export: error: {e}", file=sys.stderr)
    sys.exit(2)
  for f, p in paths.items():
    print(f"{f}: {p}")


if __name__ == "__main__":
  app.run(main)
