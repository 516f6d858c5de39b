"""ResNet encoder: torchvision param counts and names, shapes, BatchNorm/GroupNorm behaviour.

Big models only go through `jax.eval_shape` (traced, never compiled); real forwards run at
width 8.
"""
import functools
import math

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax import compile_once
from soda_jax.models import resnet
from soda_jax.models.resnet import ResNet, STAGE_SIZES, torchvision_name

RNG = jax.random.key(0)


def _abstract_variables(model, size=64, channels=3, batch=2):
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(RNG, x, train=False), x)


def _count(tree):
  return sum(math.prod(a.shape) for a in jax.tree.leaves(nn.meta.unbox(tree)))


def _torchvision_keys(depth):
  """resnetNN().state_dict() keys minus fc.* and num_batches_tracked, from its known layout."""
  bn = lambda p: {f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var")}
  keys = {"conv1.weight"} | bn("bn1")
  num_convs = 3 if depth == 50 else 2
  for i, blocks in enumerate(STAGE_SIZES[depth], start=1):
    for j in range(blocks):
      p = f"layer{i}.{j}"
      for k in range(1, num_convs + 1):
        keys |= {f"{p}.conv{k}.weight"} | bn(f"{p}.bn{k}")
      if j == 0 and (i > 1 or depth == 50):
        keys |= {f"{p}.downsample.0.weight"} | bn(f"{p}.downsample.1")
  return keys


def _mapped_keys(variables):
  keys = []
  for collection in ("params", "batch_stats"):
    for path in traverse_util.flatten_dict(nn.meta.unbox(variables.get(collection, {}))):
      keys.append(torchvision_name(path, collection))
  return keys


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (34, 21_284_672),
                                            (50, 23_508_032)])
def test_param_count_matches_torchvision(depth, expected):
  variables = _abstract_variables(ResNet(depth=depth, version="v1.5", stem="imagenet"))
  assert _count(variables["params"]) == expected


def test_params_are_logically_partitioned_float32():
  model = ResNet(depth=18, version="v1.5", stem="cifar", width=8, dtype=jnp.bfloat16)
  params = _abstract_variables(model)["params"]
  boxes = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  assert params["conv1"]["kernel"].names == ("conv_h", "conv_w", "conv_in", "conv_out")
  assert params["bn1"]["scale"].names == ("norm",)
  assert {a.dtype for a in jax.tree.leaves(nn.meta.unbox(params))} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_names(depth):
  keys = _mapped_keys(_abstract_variables(ResNet(depth=depth, version="v1.5")))
  assert len(set(keys)) == len(keys)  # injective, and every leaf mapped
  assert set(keys) == _torchvision_keys(depth)


def test_torchvision_name_examples_and_errors():
  assert torchvision_name(("layer1_0", "conv1", "kernel"), "params") == "layer1.0.conv1.weight"
  assert torchvision_name(("bn1", "scale"), "params") == "bn1.weight"
  assert (torchvision_name(("layer2_0", "downsample_1", "var"), "batch_stats")
          == "layer2.0.downsample.1.running_var")
  with pytest.raises(ValueError, match="'stats'"):
    torchvision_name(("bn1", "mean"), "stats")
  with pytest.raises(ValueError, match="'mean'"):
    torchvision_name(("bn1", "mean"), "params")


def test_v2_names_are_injective():
  variables = _abstract_variables(ResNet(depth=50, version="v2", width=32, num_groups=8))
  keys = _mapped_keys(variables)
  assert len(set(keys)) == len(keys)
  assert {"norm.weight", "layer1.0.norm1.weight", "layer1.0.downsample.0.weight"} <= set(keys)


@pytest.mark.parametrize("depth,version,stem,size,width,out", [
    (18, "v1.5", "imagenet", 64, 64, 512),
    (50, "v1.5", "imagenet", 64, 64, 2048),
    (34, "v1.5", "imagenet", 33, 16, 128),
    (18, "v1.5", "cifar", 32, 64, 512),
    (18, "v1.5", "cifar", 28, 16, 128),
    (50, "v1.5", "cifar", 27, 16, 512),
    (18, "v2", "cifar", 28, 16, 128),
    (50, "v2", "imagenet", 64, 16, 512),
])
def test_output_shapes(depth, version, stem, size, width, out):
  model = ResNet(depth=depth, version=version, stem=stem, width=width, num_groups=8)
  assert model.num_features == out
  variables = _abstract_variables(model, size=size, channels=5)  # extra (pose) channels
  x = jax.ShapeDtypeStruct((3, size, size, 5), jnp.float32)
  h = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert h.shape == (3, out) and h.dtype == jnp.float32
  assert ("batch_stats" in variables) == (version == "v1.5")


@pytest.mark.parametrize("block,last", [
    (functools.partial(resnet.BasicBlock), ("bn2", "scale")),
    (functools.partial(resnet.Bottleneck), ("bn3", "scale")),
    (functools.partial(resnet.PreActBlock, bottleneck=False), ("conv2", "kernel")),
    (functools.partial(resnet.PreActBlock, bottleneck=True), ("conv3", "kernel")),
])
def test_zero_init_residual(block, last):
  # Block-level (a whole-model init compiles for seconds); ResNet passes the flag to each block.
  conv = functools.partial(resnet._conv, dtype=jnp.float32)  # pylint: disable=protected-access
  norm = functools.partial(nn.GroupNorm, num_groups=2)
  x = jnp.zeros((1, 4, 4, 8))
  for zero in (False, True):
    b = block(features=8, strides=1, conv=conv, norm=norm, zero_init_residual=zero)
    params = nn.meta.unbox(b.init(RNG, x)["params"])
    assert np.any(params[last[0]][last[1]]) != zero
    assert np.any(params["conv1"]["kernel"])


def _tiny(version):
  return ResNet(depth=18, version=version, stem="cifar", width=8, num_groups=4)


def test_v15_forward_batchnorm():
  model = _tiny("v1.5")
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = compile_once.init(model, RNG, x=x, train=False)

  @jax.jit
  def train_fwd(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                       capture_intermediates=lambda mdl, _: mdl.name == "conv1")

  eval_fwd = jax.jit(lambda variables, x: model.apply(variables, x, train=False))

  h_train, updates = train_fwd(variables, x)
  assert h_train.shape == (4, 64) and np.all(np.isfinite(h_train))
  old, new = nn.meta.unbox(variables["batch_stats"]), updates["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  # torchvision's momentum 0.1: running = 0.9 * running + 0.1 * batch statistic (from 0 / 1).
  stem_out = updates["intermediates"]["conv1"]["__call__"][0]  # (4, 16, 16, 8)
  np.testing.assert_allclose(new["bn1"]["mean"], 0.1 * stem_out.mean((0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(new["bn1"]["var"], 0.9 + 0.1 * stem_out.var((0, 1, 2)),
                             rtol=1e-5)
  h1, h2 = eval_fwd(variables, x), eval_fwd(variables, x)
  np.testing.assert_array_equal(h1, h2)
  assert not np.allclose(h1, h_train)  # eval uses running statistics, not the batch's


def test_v2_forward_groupnorm():
  model = _tiny("v2")
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 7))
  variables = compile_once.init(model, RNG, x=x, train=False)
  assert set(variables) == {"params"}
  fwd = jax.jit(model.apply, static_argnames="train")
  h = fwd(variables, x, train=True)
  assert h.shape == (2, 64) and np.all(np.isfinite(h))
  np.testing.assert_array_equal(h, fwd(variables, x, train=False))  # no batch statistics
  # Per-example: one example's features do not depend on the rest of the batch.
  np.testing.assert_allclose(fwd(variables, x[:1], train=False), h[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=20), r"ResNet.depth=20 is not one of \(18, 34, 50\)"),
    (dict(version="v3"), r"ResNet.version='v3' is not one of"),
    (dict(stem="tiny"), r"ResNet.stem='tiny' is not one of"),
    (dict(width=0), r"ResNet.width=0 must be a positive int"),
    (dict(version="v2", width=48, num_groups=32), r"ResNet.num_groups=32 does not divide "
                                                   r"ResNet.width=48"),
])
def test_bad_fields_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ResNet(**kwargs)


def test_v15_ignores_num_groups():
  ResNet(version="v1.5", width=48, num_groups=32)  # GroupNorm is only used by v2
