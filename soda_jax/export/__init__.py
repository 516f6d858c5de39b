"""Export a trained SODA checkpoint to other frameworks; the CLI is `python -m soda_jax.export`.

  export_checkpoint(config, workdir, ['torchvision', 'stablehlo'], out)  -> {format: path}

Formats and files (see README "Export" and each module's docstring):
  torchvision  encoder_torch.safetensors  encoder + head as torchvision resnetNN's state_dict
  torch        encoder_torch.safetensors  the same scheme for any encoder (v2 GroupNorm too)
  safetensors  model.safetensors          the whole model, config in metadata; loads back bitwise
  stablehlo    encode/denoise.stablehlo   jax.export, symbolic batch, params as arguments
  saved_model  saved_model/               TF SavedModel of encode (jax2tf)
  onnx         encoder.onnx               the encoder via torch.onnx (needs requirements-test.txt)
Modules: `variables` (checkpoint -> eval variables, flat names), one module per target.
Heavy or optional imports (TensorFlow, torch) happen only inside the format that needs them.
"""
import os
from typing import Dict, Optional, Sequence

FORMATS = ("torchvision", "torch", "safetensors", "stablehlo", "saved_model", "onnx")
# The formats whose encoder takes images only: a pose='rays' encoder also reads a ray map per
# view (concatenated to the pixels after a Fourier embedding that these formats do not hold).
IMAGE_ONLY_FORMATS = ("torchvision", "torch", "saved_model", "onnx")
PLATFORMS = ("cpu", "cuda", "tpu")


def format_errors(formats: Sequence[str], config) -> str:
  """'' or one line naming the first bad value (a format, or one this model cannot take)."""
  from soda_jax.export import onnx, torchvision  # pylint: disable=g-import-not-at-top
  for f in formats:
    if f not in FORMATS:
      return f"--to={f!r} is not one of {FORMATS}"
    if f in IMAGE_ONLY_FORMATS and config.model.pose == "rays":
      return (f"--to={f}: config.model.pose='rays' encodes images with their camera rays, which "
              f"this format's encoder has no input for; use --to=stablehlo (encode takes "
              f"source_rays) or --to=safetensors")
  if "torchvision" in formats and torchvision.torchvision_error(config):
    return torchvision.torchvision_error(config)
  if "onnx" in formats:
    if torchvision.torchvision_error(config):
      return "--to=onnx exports through torchvision: " + torchvision.torchvision_error(
          config).split(": ", 1)[1]
    if onnx.missing_dependencies():
      return onnx.missing_dependencies()
  return ""


def export_checkpoint(config, workdir: str, formats: Sequence[str], out: str, *,
                      step: Optional[int] = None, online: bool = False,
                      platforms: Sequence[str] = PLATFORMS) -> Dict[str, str]:
  """Export `workdir`'s checkpoint (EMA params unless `online`) in each format under `out`.

  Returns {format: path}. Bad input raises ValueError (one line, naming the bad value) before
  any weight is read or anything compiles.
  """
  from soda_jax import config_checks  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from soda_jax.export import onnx, safetensors_io, stablehlo, tf_saved_model, torchvision
  from soda_jax.export import variables as variables_lib
  # pylint: enable=g-import-not-at-top
  formats = list(dict.fromkeys(formats))
  err = format_errors(formats, config)
  if err:
    raise ValueError(err)
  config_checks.check(config)
  variables, step = variables_lib.from_checkpoint(config, workdir, step, online=online)
  os.makedirs(out, exist_ok=True)
  paths = {}
  for f in formats:
    if f in ("torchvision", "torch"):
      paths[f] = torchvision.save(os.path.join(out, torchvision.FILENAME), variables, config,
                                  step=step, online=online)
    elif f == "safetensors":
      paths[f] = safetensors_io.save(os.path.join(out, safetensors_io.FILENAME), variables,
                                     config, step=step, online=online)
    elif f == "stablehlo":
      paths[f] = stablehlo.save(out, variables, config, platforms=platforms)["encode"]
    elif f == "saved_model":
      paths[f] = tf_saved_model.save(out, variables, config, platforms=platforms)
    elif f == "onnx":
      paths[f] = onnx.save(out, variables, config, step=step, online=online)
  return paths
