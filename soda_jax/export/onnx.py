"""The encoder as ONNX, through PyTorch: our torchvision export -> `torch.onnx.export`.

Graph: images (b, C, H, W) float32, NCHW as in `torchvision.py` -> h (b, F), z (b, latent_dim),
batch dimension dynamic; opset 18 (torch's exporter default). v1.5 (BatchNorm) encoders only.

Why this route: tf2onnx converts TensorFlow graphs op by op, but our SavedModel is one
XlaCallModule op (jax2tf's only mode in the pinned jax), which tf2onnx has no handler for;
jax2onnx (direct from JAX) requires orbax-checkpoint<0.11.37, below the project's pin. torch's
exporter (the dynamo-based one, which needs onnxscript) reads torchvision's module, whose parity
with soda_jax the tests prove. It needs torch, torchvision, onnx and onnxscript installed
(requirements-test.txt); without them `--to=onnx` fails with a message saying so.
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
  import torch  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  tv_path = os.path.join(out_dir, tv.FILENAME)
  if not os.path.exists(tv_path):
    tv.save(tv_path, variables, config, step=step, online=online)
  resnet = tv.load_resnet(tv_path)

  class Features(torch.nn.Module):
    def __init__(self, net):
      super().__init__()
      self.net = net

    def forward(self, images):
      return tv.features(self.net, images)

  s, c = config.data.image_size, config.data.channels
  example = torch.zeros(2, c, s, s)
  path = os.path.join(out_dir, FILENAME)
  torch.onnx.export(Features(resnet).eval(), (example,), path, input_names=["images"],
                    output_names=["h", "z"], dynamic_shapes=({0: torch.export.Dim("b")},),
                    dynamo=True, verbose=False)
  return path
