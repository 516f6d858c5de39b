"""The decoder's fused GroupNorm (models/group_norm.py) against flax's nn.GroupNorm + autodiff."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax.models import group_norm


def _reference(params, x, mul, add, groups, act):
  """The composition it replaces: flax GroupNorm (float32), then AdaGN, then the activation."""
  h = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32).apply(
      {"params": params}, x)
  if mul is not None:
    h = h * mul[:, None, None, :]
  if add is not None:
    h = h + add[:, None, None, :]
  return jax.nn.silu(h) if act == "silu" else h


def _inputs(shape, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  n, c = shape[0], shape[-1]
  # An offset and a scale per channel, so the statistics are not those of N(0, 1).
  x = (3.0 * jax.random.normal(ks[0], shape) + jax.random.normal(ks[1], (c,)) * 2).astype(dtype)
  params = {"scale": 1 + 0.3 * jax.random.normal(ks[2], (c,)),
            "bias": 0.3 * jax.random.normal(ks[3], (c,))}
  mul = 1 + 0.5 * jax.random.normal(ks[4], (n, c))
  add = 0.5 * jax.random.normal(jax.random.fold_in(ks[4], 1), (n, c))
  return params, x, mul, add


@pytest.mark.parametrize("shape,groups,act,modulated", [
    ((2, 5, 4, 8), 4, "silu", True),
    ((2, 5, 4, 8), 1, "silu", False),  # one group: LayerNorm over H, W, C
    ((3, 4, 4, 6), 6, None, True),  # one channel per group: InstanceNorm
    ((1, 2, 3, 16), 8, None, False),
])
def test_values_and_gradients_match_flax_and_autodiff(shape, groups, act, modulated):
  params, x, mul, add = _inputs(shape)
  if not modulated:
    mul = add = None
  norm = group_norm.GroupNorm(num_groups=groups)

  def ours(p, x, mul, add):
    return norm.apply({"params": p}, x, mul, add, act=act)

  def ref(p, x, mul, add):
    return _reference(p, x, mul, add, groups, act)

  np.testing.assert_allclose(ours(params, x, mul, add), ref(params, x, mul, add),
                             rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.PRNGKey(9), shape)  # a non-uniform output cotangent
  argnums = (0, 1, 2, 3) if modulated else (0, 1)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums)(params, x, mul, add)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums)(params, x, mul, add)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(scale, 1.0))
  # The jitted program computes the same (the custom VJP under jit, as in the train step).
  g_jit = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums))(params, x, mul, add)
  for a, b in zip(jax.tree.leaves(g_jit), jax.tree.leaves(g_ours)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_input_keeps_float32_statistics_and_its_own_gradient_dtype():
  params, x, mul, add = _inputs((2, 4, 4, 8), jnp.bfloat16)
  norm = group_norm.GroupNorm(num_groups=4)
  out = norm.apply({"params": params}, x, mul, add, act="silu")
  assert out.dtype == jnp.float32
  ref = _reference(params, x.astype(jnp.float32), mul, add, 4, "silu")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  gx = jax.grad(lambda x: jnp.sum(norm.apply({"params": params}, x, mul, add, act="silu")))(x)
  assert gx.dtype == jnp.bfloat16


def test_params_are_flax_groupnorms_names_shapes_and_axes():
  """Checkpoints and exports written before the fused op still load: same tree, same axes."""
  x = jnp.ones((1, 2, 2, 8))
  ours = group_norm.GroupNorm(num_groups=4, param_axes=("norm",)).init(jax.random.PRNGKey(0), x)
  theirs = nn.GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, nn.unbox(ours)) == jax.tree.map(jnp.shape, theirs)
  assert ours["params"]["scale"].names == ("norm",)
  np.testing.assert_array_equal(nn.unbox(ours)["params"]["scale"], np.ones(8))
  np.testing.assert_array_equal(nn.unbox(ours)["params"]["bias"], np.zeros(8))


def test_bad_groups_and_activation_are_named():
  x = jnp.ones((1, 2, 2, 6))
  with pytest.raises(ValueError, match="num_groups=4 does not divide the 6 channels"):
    group_norm.GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="act='relu' is not one of"):
    group_norm.GroupNorm(num_groups=2).init(jax.random.PRNGKey(0), x, act="relu")


def _exact_loss(params, x, cot, groups):
  """float64, two-pass variance: the value the float32 ops approximate."""
  n, h, w, c = x.shape
  xg = x.reshape(n, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
  y = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * params["scale"] + params["bias"]
  return jnp.sum(jax.nn.silu(y) * cot)


def test_gradients_of_offset_activations_are_no_worse_than_flax():
  # Activations far from zero mean (offset 10, std 1) stress E[x^2] - E[x]^2 and the per-channel
  # sums of dy * x: the fused op's float32 gradients must stay as close to the exact float64
  # ones as flax's own GroupNorm + autodiff.
  shape, groups = (2, 8, 8, 16), 4
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 10.0
  cot = jax.random.normal(jax.random.PRNGKey(1), shape)
  params = {"scale": jnp.ones(16), "bias": jnp.zeros(16)}
  ours = jax.grad(lambda p, x: jnp.sum(group_norm.GroupNorm(num_groups=groups).apply(
      {"params": p}, x, act="silu") * cot), (0, 1))(params, x)
  flax = jax.grad(lambda p, x: jnp.sum(
      _reference(p, x, None, None, groups, "silu") * cot), (0, 1))(params, x)
  with jax.enable_x64(True):
    exact = jax.grad(_exact_loss, (0, 1))(
        jax.tree.map(lambda t: np.asarray(t, np.float64), params), np.asarray(x, np.float64),
        np.asarray(cot, np.float64), groups)
    exact = [np.asarray(e) for e in jax.tree.leaves(exact)]  # float64, kept outside the context
  for o, f, e in zip(jax.tree.leaves(ours), jax.tree.leaves(flax), exact):
    err_ours = float(np.max(np.abs(np.asarray(o, np.float64) - e)))
    err_flax = float(np.max(np.abs(np.asarray(f, np.float64) - e)))
    assert err_ours <= 1.5 * err_flax + 1e-6 * float(np.max(np.abs(e))), (err_ours, err_flax)
