"""The encoder as ONNX, through PyTorch: our torchvision export -> `torch.onnx.export`.

Graph: images (b, C, H, W) float32, NCHW as in `torchvision.py` -> h (b, F), z (b, latent_dim),
batch dimension dynamic; opset 18 (torch's exporter default). v1.5 (BatchNorm) encoders only.

Why this route: tf2onnx converts TensorFlow graphs op by op, but our SavedModel is one
XlaCallModule op (jax2tf's only mode in the pinned jax), which tf2onnx has no handler for;
jax2onnx (direct from JAX) requires orbax-checkpoint<0.11.37, below the project's pin. torch's
exporter (the dynamo-based one, which needs onnxscript) reads torchvision's module, whose parity
with soda_jax the tests prove; it runs in its own process (see `torchvision.run_torch`). It
needs torch, torchvision, onnx and onnxscript installed (requirements-test.txt); without them
`--to=onnx` fails with a message saying so.
"""
import os
from typing import Any, Mapping

import ml_collections

from soda_jax.export import torchvision as tv

FILENAME = "encoder.onnx"


def missing_dependencies() -> str:
  """'' if torch's ONNX export can run here, else a one-line reason."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in ("torch", "torchvision", "onnx", "onnxscript")
             if importlib.util.find_spec(m) is None]
  if missing:
    return (f"--to=onnx needs {', '.join(missing)} (pip install -r requirements-test.txt); "
            f"not importable here")
  return ""


def save(out_dir: str, variables: Mapping[str, Any], config: ml_collections.ConfigDict, *,
         step: int, online: bool = False) -> str:
  """encoder.onnx (and the torchvision file it is made from) under `out_dir`.

  The torchvision file is always (re)written from `variables`: one left in `out_dir` by an
  earlier export may hold other weights."""
  os.makedirs(out_dir, exist_ok=True)
  tv_path = tv.save(os.path.join(out_dir, tv.FILENAME), variables, config, step=step,
                    online=online)
  path = os.path.join(out_dir, FILENAME)
  s, c = config.data.image_size, config.data.channels
  tv.run_torch("onnx", tv_path, path, str(s), str(s), str(c))
  return path
