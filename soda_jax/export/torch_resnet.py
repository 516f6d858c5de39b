"""The PyTorch side of the torchvision export: torch, torchvision, safetensors, numpy only.

No JAX or TensorFlow here, so it runs in its own process (`torchvision.run_torch`):

  python -m soda_jax.export.torch_resnet features ENCODER.safetensors IMAGES.npy OUT.npz
      h, z of NHWC float32 images (transposed to NCHW here) -> OUT.npz
  python -m soda_jax.export.torch_resnet onnx ENCODER.safetensors OUT.onnx H W C
      the loaded ResNet, forward -> (h, z), through torch.onnx.export (dynamic batch)
  python -m soda_jax.export.torch_resnet keys DEPTH NUM_CLASSES
      JSON {name: [shape, dtype]} of torchvision's resnetNN and of build_resnet at width 64

In a notebook or script of your own, `build_resnet` / `load_resnet` / `features` are plain
functions (import this module in a process that does not also hold TensorFlow).
"""
import json
import sys

import numpy as np
import safetensors
import safetensors.numpy
import torch
from torch import nn
import torchvision


def build_resnet(depth: int, *, width: int = 64, stem: str = "imagenet", in_channels: int = 3,
                 num_classes: int = 1000) -> torchvision.models.ResNet:
  """torchvision's `resnetNN(num_classes=...)`, with the documented swaps for our variants.

  width=64, stem='imagenet', in_channels=3 is torchvision's model unchanged. Another width
  rebuilds the stages with torchvision's own blocks and `_make_layer`; stem='cifar' replaces
  conv1 by a 3x3 stride-1 conv and maxpool by Identity; in_channels != 3 gives conv1 that many.
  """
  if depth not in (18, 34, 50) or stem not in ("imagenet", "cifar"):
    raise ValueError(f"depth={depth!r}, stem={stem!r}: need 18/34/50 and imagenet/cifar")
  model = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
  if width != 64:
    block = type(model.layer1[0])
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    model.inplanes = width
    model.bn1 = model._norm_layer(width)  # pylint: disable=protected-access
    for i, n in enumerate(blocks):
      setattr(model, f"layer{i + 1}", model._make_layer(  # pylint: disable=protected-access
          block, width * 2**i, n, stride=1 if i == 0 else 2))
    model.fc = nn.Linear(width * 8 * block.expansion, num_classes)
  if stem == "cifar":
    model.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
  elif width != 64 or in_channels != 3:
    model.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
  return model


def load_resnet(path: str) -> torchvision.models.ResNet:
  """The ResNet of an exported 'torchvision' file, loaded with strict=True, in eval mode."""
  with safetensors.safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
  if meta.get("format") != "torchvision":
    raise ValueError(f"{path}: metadata format={meta.get('format')!r}, expected 'torchvision'")
  model = build_resnet(int(meta["arch"][len("resnet"):]), width=int(meta["width"]),
                       stem=meta["stem"], in_channels=int(meta["in_channels"]),
                       num_classes=int(meta["latent_dim"]))
  tensors = safetensors.numpy.load_file(path)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
  return model.eval()


def features(model: torchvision.models.ResNet, images_nchw: torch.Tensor):
  """(h, z): the pooled features fc reads, and fc's output (the latent)."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(images_nchw))))
  x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
  h = torch.flatten(model.avgpool(x), 1)
  return h, model.fc(h)


class Features(nn.Module):
  def __init__(self, net):
    super().__init__()
    self.net = net

  def forward(self, images):
    return features(self.net, images)


def _shapes(module) -> dict:
  return {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
          for k, v in module.state_dict().items()}


def main(argv) -> None:
  cmd, *args = argv
  if cmd == "features":
    path, images, out = args
    x = torch.from_numpy(np.load(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
      h, z = features(load_resnet(path), x)
    np.savez(out, h=h.numpy(), z=z.numpy())
  elif cmd == "onnx":
    path, out, height, width, channels = args
    example = torch.zeros(2, int(channels), int(height), int(width))
    torch.onnx.export(Features(load_resnet(path)).eval(), (example,), out,
                      input_names=["images"], output_names=["h", "z"],
                      dynamic_shapes=({0: torch.export.Dim("b")},), dynamo=True)
  elif cmd == "keys":
    depth, num_classes = int(args[0]), int(args[1])
    print(json.dumps({
        "torchvision": _shapes(getattr(torchvision.models, f"resnet{depth}")(
            num_classes=num_classes)),
        "build_resnet": _shapes(build_resnet(depth, num_classes=num_classes))}))
  else:
    raise SystemExit(f"unknown command {cmd!r}: features | onnx | keys")


if __name__ == "__main__":
  main(sys.argv[1:])
