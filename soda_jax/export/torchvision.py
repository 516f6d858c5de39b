"""The encoder (+ latent head) as a PyTorch state_dict, in safetensors, for torchvision's ResNet.

The table (`conversion_table`) is driven by the variable tree, not by hard-coded shapes: every
encoder variable goes to `resnet.torchvision_name(path)` with a per-tensor transform

  conv kernel (kh, kw, in, out) HWIO -> (out, in, kh, kw) OIHW: `conv1.weight`,
                                        `layerK.I.convJ.weight`, `layerK.I.downsample.0.weight`
  norm scale / bias                  -> weight / bias: `bn1.weight`, `layerK.I.downsample.1.bias`
  BatchNorm mean / var               -> running_mean / running_var
  head kernel  (num_features, latent)  -> `fc.weight` (latent, num_features), head bias -> `fc.bias`

plus one `num_batches_tracked` (int64, = the checkpoint's step: one BatchNorm update per train
step) for each BatchNorm. The latent head is torchvision's `fc`: a v1.5 export loads with
`strict=True` into `torchvision.models.resnetNN(num_classes=latent_dim)`, whose output is z and
whose pooled features (the input of `fc`) are h. Inputs are NCHW float32 with the same pixel
values soda_jax's encoder sees (NHWC in [-1, 1]; no ImageNet mean/std).

Two documented swaps, which `torch_resnet.build_resnet` makes (nothing else changes):
  * stem='cifar': `model.conv1 = nn.Conv2d(C, width, 3, 1, 1, bias=False)`,
    `model.maxpool = nn.Identity()`;
  * an input with C != 3 channels (e.g. grey images): conv1 with C input channels.
A width other than 64 (the small test / demo encoders) is torchvision's own ResNet class with its
stages rebuilt by its own `_make_layer` at that width.

format 'torchvision' is for the v1.5 (BatchNorm) encoder. The v2 (pre-activation GroupNorm)
encoder has no torchvision counterpart; format 'torch' writes any encoder with the same scheme
(names from `resnet.torchvision_name`: 'layerK.I.normJ.weight', 'layerK.I.convJ.weight',
'layerK.I.downsample.0.weight', final 'norm.weight' / 'norm.bias'; no running stats), for a
hand-written PyTorch module.
"""
from typing import Any, Callable, Dict, List, Mapping, Tuple

from flax import traverse_util
import ml_collections
import numpy as np
import safetensors.numpy

from soda_jax.models import resnet

FILENAME = "encoder_torch.safetensors"


def _hwio_to_oihw(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (3, 2, 0, 1))


def _dense_to_linear(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (1, 0))


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _transform(path: Tuple[str, ...], value) -> Callable[[np.ndarray], np.ndarray]:
  if path[-1] == "kernel":
    if np.ndim(value) == 4:
      return _hwio_to_oihw
    if np.ndim(value) == 2:
      return _dense_to_linear
    raise ValueError(f"kernel {'.'.join(path)} has shape {np.shape(value)}: not a conv or dense")
  return _identity


def conversion_table(variables: Mapping[str, Any]) -> List[Tuple[str, str, Callable]]:
  """[(our flat name, torch name, transform)] for the encoder's and head's variables."""
  table = []
  for collection in ("params", "batch_stats"):
    tree = variables.get(collection, {}).get("encoder", {})
    for path, value in traverse_util.flatten_dict(tree).items():
      table.append((".".join((collection, "encoder") + path),
                    resnet.torchvision_name(path, collection), _transform(path, value)))
  head = variables["params"]["head"]
  for leaf, name in (("kernel", "fc.weight"), ("bias", "fc.bias")):
    table.append((f"params.head.{leaf}", name, _transform(("head", leaf), head[leaf])))
  return table


def state_dict(variables: Mapping[str, Any], *, step: int) -> Dict[str, np.ndarray]:
  """The encoder + head as {torch name: array}, in the table's order."""
  flat = {".".join(k): v for k, v in traverse_util.flatten_dict(dict(variables)).items()}
  out = {}
  for ours, theirs, fn in conversion_table(variables):
    out[theirs] = np.ascontiguousarray(fn(np.asarray(flat[ours])))
  for name in list(out):  # one counter per BatchNorm (the modules that have running stats)
    if name.endswith(".running_mean"):
      out[name[:-len("running_mean")] + "num_batches_tracked"] = np.asarray(step, np.int64)
  return out


def torchvision_error(config: ml_collections.ConfigDict) -> str:
  """'' if the encoder has a torchvision counterpart, else why not (one line)."""
  enc = config.model.encoder
  if enc.version != "v1.5":
    return (f"--to=torchvision: config.model.encoder.version={enc.version!r} (pre-activation "
            f"GroupNorm ResNet) has no torchvision counterpart; --to=torch writes it with "
            f"torchvision-style names (see soda_jax/export/torchvision.py)")
  return ""


def metadata(config: ml_collections.ConfigDict, *, step: int, online: bool) -> Dict[str, str]:
  enc = config.model.encoder
  return {"format": "torchvision" if enc.version == "v1.5" else "torch",
          "arch": f"resnet{enc.depth}", "version": enc.version, "width": str(enc.width),
          "stem": enc.stem, "in_channels": str(config.data.channels),
          "num_groups": str(enc.get("num_groups", 32)), "latent_dim": str(config.model.latent_dim),
          "step": str(int(step)), "params": "online" if online else "ema",
          "input": "NCHW float32, the pixels soda_jax's encoder sees ([-1, 1], no mean/std)",
          "output": "fc(h) = z (latent); h = the pooled features fc reads"}


def save(path: str, variables: Mapping[str, Any], config: ml_collections.ConfigDict, *,
         step: int, online: bool = False) -> str:
  safetensors.numpy.save_file(state_dict(variables, step=step), path,
                              metadata=metadata(config, step=step, online=online))
  return path


# ------------------------------------------------------------------ the PyTorch side
def torch_process_env() -> dict:
  """This process's environment with the repository root first on PYTHONPATH: what a torch
  process started from here needs to import soda_jax (and, in the tests, `tests.torch_worker`)."""
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p))


def run_torch(*args: str) -> str:
  """`python -m soda_jax.export.torch_resnet ARGS` in a fresh process; its stdout.

  torch runs in its own process: in one process with TensorFlow (imported by clu), importing
  torchvision (-> triton) crashed here with a segfault, and the torch side needs neither JAX
  nor TF. Raises RuntimeError with the child's stderr tail if it fails.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-m", "soda_jax.export.torch_resnet", *args],
                        capture_output=True, text=True, check=False, env=torch_process_env())
  if proc.returncode:
    raise RuntimeError(f"soda_jax.export.torch_resnet {' '.join(args)} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc.stdout
