"""SODA's encoder: ResNet-18/34/50, v1.5 (BatchNorm, torchvision layout) or v2 (pre-activation,
GroupNorm). NHWC in, global-average-pooled features out; no classifier.

v1.5 mirrors torchvision's `resnetNN` exactly (stride on the bottleneck's 3x3 conv, bias-free
convs, the same padding and param count), so `torchvision_name` can map every variable to its
state_dict key and weights can move both ways. v2 follows the pre-activation design (He et al.
2016, as in BiT): norm -> ReLU -> conv inside each block, a projection shortcut fed from the
pre-activated input, and one final norm + ReLU before pooling. It has no batch statistics, so it
behaves the same in train and eval mode.

Variables from `init` are boxed: every kernel / scale / bias is an `nn.LogicallyPartitioned`
carrying logical axis names (conv kernels ('conv_h', 'conv_w', 'conv_in', 'conv_out'), norm
params ('norm',)). Call `nn.meta.unbox` for plain arrays. BatchNorm statistics are plain arrays.
"""
import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from soda_jax.models import convolution

Dtype = Any

DEPTHS = (18, 34, 50)
VERSIONS = ("v1.5", "v2")
STEMS = ("imagenet", "cifar")
# Blocks per stage (torchvision); depth 50 uses bottlenecks (expansion 4).
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
NORM_AXES = ("norm",)

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_ones = nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES)
_zeros = nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES)


def _conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype,
          zero_init: bool = False, name: Optional[str] = None) -> nn.Conv:
  """Bias-free conv with torchvision's symmetric padding (k // 2 each side).

  Flax's 'SAME' pads a stride-2 conv on an even input only at the end; torchvision pads both
  sides. Output sizes agree (ceil(n / stride)), values would not, so pad explicitly.
  """
  pad = kernel // 2
  init = nn.initializers.zeros if zero_init else _kaiming_fan_out
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      use_bias=False, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
      conv_general_dilated=convolution.conv_general_dilated, name=name)


class BasicBlock(nn.Module):
  """v1.5 basic block (R18/34): conv3x3 -> bn -> relu -> conv3x3 -> bn, + shortcut, relu."""
  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 3, self.strides, name="conv1")(x)))
    y = self.conv(self.features, 3, name="conv2")(y)
    y = self.norm(name="bn2", **({"scale_init": _zeros} if self.zero_init_residual else {}))(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = self.conv(self.features, 1, self.strides, name="downsample_0")(x)
      x = self.norm(name="downsample_1")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """v1.5 bottleneck (R50): 1x1 -> 3x3 (strided, the "v1.5" choice) -> 1x1 (x4), + shortcut."""
  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    out = 4 * self.features
    y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 1, name="conv1")(x)))
    y = nn.relu(self.norm(name="bn2")(self.conv(self.features, 3, self.strides, name="conv2")(y)))
    y = self.conv(out, 1, name="conv3")(y)
    y = self.norm(name="bn3", **({"scale_init": _zeros} if self.zero_init_residual else {}))(y)
    if x.shape[-1] != out or self.strides != 1:
      x = self.conv(out, 1, self.strides, name="downsample_0")(x)
      x = self.norm(name="downsample_1")(x)
    return nn.relu(x + y)


class PreActBlock(nn.Module):
  """v2 block: (norm -> relu -> conv) x 2 (basic) or x 3 (bottleneck, 1x1 -> 3x3 -> 1x1 x4).

  The projection shortcut (when the shape changes) reads the pre-activated input, as in BiT;
  otherwise the shortcut is the raw input, so the residual stream is never normalised.
  zero_init_residual zeroes the branch's last conv (there is no norm after it).
  """
  features: int
  strides: int
  bottleneck: bool
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    out = 4 * self.features if self.bottleneck else self.features
    pre = nn.relu(self.norm(name="norm1")(x))
    shortcut = x
    if x.shape[-1] != out or self.strides != 1:
      shortcut = self.conv(out, 1, self.strides, name="downsample_0")(pre)
    if self.bottleneck:
      # (kernel, stride, features) of each conv in the branch.
      specs = ((1, 1, self.features), (3, self.strides, self.features), (1, 1, out))
    else:
      specs = ((3, self.strides, self.features), (3, 1, out))
    y = pre
    for i, (k, s, f) in enumerate(specs, start=1):
      if i > 1:
        y = nn.relu(self.norm(name=f"norm{i}")(y))
      y = self.conv(f, k, s, zero_init=self.zero_init_residual and i == len(specs),
                    name=f"conv{i}")(y)
    return shortcut + y


class ResNet(nn.Module):
  """ResNet encoder: (B, H, W, C_in) -> pooled features (B, num_features), float32.

  C_in is free (extra pose / ray channels are fine). Param names: see `torchvision_name`.

  Attributes:
    depth: 18, 34 or 50.
    version: 'v1.5' (BatchNorm; torchvision names and param counts) or 'v2' (pre-activation,
      GroupNorm; no batch_stats).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
    width: channels of the first stage (64 = torchvision); stage i has width * 2**i (x4 in R50).
    num_groups: GroupNorm groups (v2 only); must divide `width`, hence every channel count.
    dtype: compute dtype. Params are always float32; norm statistics are reduced in float32.
    zero_init_residual: start every residual branch at zero (v1.5: last BN scale, like
      torchvision's flag; v2: last conv kernel). Default False, like torchvision.
  """
  depth: int = 50
  version: str = "v1.5"
  stem: str = "imagenet"
  width: int = 64
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  zero_init_residual: bool = False

  def __post_init__(self):
    self.validate()  # at construction, so a bad config fails before anything traces
    super().__post_init__()

  def validate(self) -> None:
    """Raises ValueError naming the field and its bad value."""
    for field, allowed in (("depth", DEPTHS), ("version", VERSIONS), ("stem", STEMS)):
      value = getattr(self, field)
      if value not in allowed:
        raise ValueError(f"ResNet.{field}={value!r} is not one of {allowed}")
    for field in ("width", "num_groups"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ResNet.{field}={value!r} must be a positive int")
    if self.version == "v2" and self.width % self.num_groups:
      # Every GroupNorm sees width * 2**i (x4) channels, so dividing width is enough.
      raise ValueError(f"ResNet.num_groups={self.num_groups} does not divide "
                       f"ResNet.width={self.width} (GroupNorm groups must divide every "
                       f"channel count, all multiples of width)")

  @property
  def num_features(self) -> int:
    """Size of the pooled output h."""
    return self.width * 8 * (4 if self.depth == 50 else 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype)
    v2 = self.version == "v2"
    if v2:
      norm = functools.partial(
          nn.GroupNorm, num_groups=self.num_groups, epsilon=1e-5, dtype=self.dtype,
          param_dtype=jnp.float32, scale_init=_ones, bias_init=_zeros)
    else:
      # momentum 0.9 here == torchvision's 0.1 (the weight of the new batch statistic). One
      # difference: torch updates running_var with the unbiased batch variance, Flax biased.
      norm = functools.partial(
          nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
          dtype=self.dtype, param_dtype=jnp.float32, scale_init=_ones, bias_init=_zeros)

    # Stem. (B, H, W, C_in) -> (B, H/4, W/4, width) imagenet, (B, H, W, width) cifar.
    if self.stem == "imagenet":
      x = conv(self.width, 7, 2, name="conv1")(x)
    else:
      x = conv(self.width, 3, 1, name="conv1")(x)
    if not v2:  # v2 normalises at the start of each block instead
      x = nn.relu(norm(name="bn1")(x))
    if self.stem == "imagenet":
      # torchvision pads with -inf on both sides; so does max_pool's explicit padding.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    bottleneck = self.depth == 50
    for i, num_blocks in enumerate(STAGE_SIZES[self.depth]):
      for j in range(num_blocks):
        kwargs = dict(features=self.width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                      conv=conv, norm=norm, zero_init_residual=self.zero_init_residual,
                      name=f"layer{i + 1}_{j}")
        if v2:
          x = PreActBlock(bottleneck=bottleneck, **kwargs)(x)
        else:
          x = (Bottleneck if bottleneck else BasicBlock)(**kwargs)(x)
    if v2:
      x = nn.relu(norm(name="norm")(x))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, num_features)


# Flax leaf names -> torchvision's, per collection.
_LEAF_NAMES = {
    "params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
    "batch_stats": {"mean": "running_mean", "var": "running_var"},
}


def torchvision_name(path: Tuple[str, ...], collection: str) -> str:
  """A flattened variable path -> its torchvision state_dict key.

  ('layer1_0', 'conv1', 'kernel'), 'params'         -> 'layer1.0.conv1.weight'
  ('layer2_0', 'downsample_1', 'var'), 'batch_stats' -> 'layer2.0.downsample.1.running_var'
  ('bn1', 'scale'), 'params'                         -> 'bn1.weight'

  For v1.5 this is exactly torchvision's `resnetNN` key set minus fc.* and num_batches_tracked
  (names only: conv kernels are HWIO here, OIHW there). v2 names follow the same scheme
  ('layer1.0.norm1.weight', 'norm.bias'). Unknown collections or leaf names raise ValueError,
  so nothing is exported under a made-up name.
  """
  leaves = _LEAF_NAMES.get(collection)
  if leaves is None:
    raise ValueError(f"collection={collection!r} is not one of {tuple(_LEAF_NAMES)}")
  *modules, leaf = path
  if leaf not in leaves:
    raise ValueError(f"path={path!r}: leaf {leaf!r} is not one of {tuple(leaves)} "
                     f"in collection {collection!r}")
  parts = []
  for m in modules:
    # 'layer3_1' -> 'layer3.1', 'downsample_0' -> 'downsample.0'; 'conv1', 'bn1' unchanged.
    head, sep, tail = m.rpartition("_")
    parts.extend((head, tail) if sep and tail.isdigit() else (m,))
  return ".".join(parts + [leaves[leaf]])
