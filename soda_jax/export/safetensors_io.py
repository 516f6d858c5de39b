"""The whole model (encoder + head + decoder + BatchNorm statistics) as one safetensors file.

Tensor names are the flat dotted variable paths (`variables.flatten`):
  params.encoder.layer1_0.conv1.kernel      HWIO, float32 (as in soda_jax, untransposed)
  params.head.kernel / params.head.bias      (num_features, latent_dim) / (latent_dim,)
  params.decoder.down_0_res_0.conv_0.kernel  ...
  batch_stats.encoder.bn1.mean / .var        (v1.5 encoders only)
The string metadata holds `format` ('soda_jax'), `format_version`, `step`, `params` ('ema' or
'online') and `config` (the run's ConfigDict as JSON), so `load` can rebuild the model with no
other file. safetensors stores raw little-endian bytes, so the round trip is bitwise, and
loading never unpickles anything.
"""
import json
import os
from typing import Any, Dict, Tuple

import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from soda_jax.export import variables as variables_lib

FORMAT = "soda_jax"
FORMAT_VERSION = "1"
FILENAME = "model.safetensors"


def save(path: str, variables: Dict[str, Any], config: ml_collections.ConfigDict, *, step: int,
         online: bool = False) -> str:
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          variables_lib.flatten(variables).items()}
  metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": str(int(step)),
              "params": "online" if online else "ema", "config": config.to_json()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors.numpy.save_file(flat, path, metadata=metadata)
  return path


def read(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """(flat tensors, metadata) of any safetensors file; ValueError saying what is wrong."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError (and OSError) types
    raise ValueError(f"{path} ({os.path.getsize(path)} bytes) is not a complete safetensors "
                     f"file (truncated or another format): {type(e).__name__}: {e}") from e
  return flat, metadata


def load(path: str) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, Dict[str, str]]:
  """(variables as nested numpy dicts, config, metadata) of a file written by `save`.

  Checks that the file is a soda_jax export of a supported version and that its tensors are
  exactly the ones its config's model has (names, shapes, dtypes); raises ValueError naming what
  is wrong otherwise.
  """
  flat, metadata = read(path)
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path} is not a soda_jax export: metadata format="
                     f"{metadata.get('format')!r}, expected {FORMAT!r} (metadata keys: "
                     f"{sorted(metadata)}; {len(flat)} tensors, e.g. {sorted(flat)[:2]})")
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version={metadata.get('format_version')!r}, this "
                     f"soda_jax reads {FORMAT_VERSION!r}")
  config = ml_collections.ConfigDict(json.loads(metadata["config"]))
  variables = variables_lib.unflatten(flat)
  model = variables_lib.build_model(config)
  variables_lib.check_matches(variables, variables_lib.abstract_variables(model, config), path)
  return variables, config, metadata
