"""The decoder's attention block (models/layers.py) against the composition it replaced:
nn.Dense projections around `jax.nn.dot_product_attention` on (B, L, heads, dh)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax.models import layers


class _Reference(nn.Module):
  """The block as it was before session 29 (same parameter tree)."""
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = layers.group_norm(2, "norm")(x).astype(self.dtype).reshape(b, hgt * wid, c)
    qkv = layers.dense(3 * c, dtype=self.dtype, name="qkv")(h)
    qkv = qkv.reshape(b, hgt * wid, 3, self.heads, c // self.heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    out = layers.dense(c, zero_init=True, dtype=self.dtype, name="out")(
        out.reshape(b, hgt * wid, c))
    return x + out.reshape(x.shape).astype(x.dtype)


def _setup(shape, heads, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), shape)
  block = layers.AttnBlock(num_heads=heads, num_groups=2)
  ref = _Reference(heads)
  params = block.init(jax.random.PRNGKey(1), x)
  # Perturbed, so the zero-initialised output projection does not hide the attention.
  leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(
      tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return x, block, ref, params


def test_parameters_are_those_of_plain_dense_layers():
  # Names, shapes, logical axes and the initial values themselves: checkpoints, exports and
  # seeded runs are unchanged by the head-major form.
  x = jnp.ones((2, 4, 4, 8))
  new = layers.AttnBlock(num_heads=2, num_groups=2).init(jax.random.PRNGKey(3), x)
  old = _Reference(2).init(jax.random.PRNGKey(3), x)
  assert jax.tree.structure(new) == jax.tree.structure(old)
  for a, b in zip(jax.tree.leaves(new, is_leaf=lambda v: isinstance(v, nn.Partitioned)),
                  jax.tree.leaves(old, is_leaf=lambda v: isinstance(v, nn.Partitioned))):
    assert a.names == b.names
    np.testing.assert_array_equal(a.value, b.value)
  assert new["params"]["qkv"]["kernel"].value.shape == (8, 24)
  assert new["params"]["out"]["kernel"].value.shape == (8, 8)
  assert not np.any(new["params"]["out"]["kernel"].value)  # zero-initialised output


@pytest.mark.parametrize("shape,heads", [((2, 3, 5, 8), 2), ((1, 4, 4, 12), 3), ((2, 2, 2, 4), 1)])
def test_values_and_gradients_match_dot_product_attention(shape, heads):
  x, block, ref, params = _setup(shape, heads)
  cot = jax.random.normal(jax.random.PRNGKey(4), shape)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply(p, x) * cot)

  np.testing.assert_allclose(jax.jit(block.apply)(params, x), jax.jit(ref.apply)(params, x),
                             rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(block), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
  x, _, _, params = _setup((2, 4, 4, 8), 2)
  f32 = layers.AttnBlock(num_heads=2, num_groups=2).apply(params, x)
  bf16 = layers.AttnBlock(num_heads=2, num_groups=2, dtype=jnp.bfloat16).apply(params, x)
  assert bf16.dtype == x.dtype  # the residual stream keeps the input's dtype
  np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=0.05)
