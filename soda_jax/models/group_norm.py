"""The decoder's GroupNorm, with its affine, AdaGN modulation and SiLU in one custom-VJP op.

Why: autodiff of `silu((GN(x) * gamma + beta) * (1 + s) + b)` saves the normalised activations
and several intermediates of every norm for the backward pass, and XLA:CPU spends one loop fusion
per intermediate on them: GroupNorm + SiLU forward + gradient took 65 ms at (32, 32, 32, 256) on
2 CPU devices, against 25 ms written as below (docs/benchmarks.md, "Session 21"). Here the
per-(example, channel) scale and shift are folded into one `a`, `b` pair,

    out = act(xhat * a + b),   xhat = (x - mean_g) * rsqrt(var_g + eps)      (per group g)

and the backward recomputes xhat from x and the saved statistics (N, G), then needs two sums per
channel (of dy * xhat and of dy):

    da = sum_hw dy * xhat,  db = sum_hw dy,  dxhat = dy * a
    dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))

where both group means come from da, db and a alone. Statistics and output are float32 (as the
flax GroupNorm it replaces, with dtype=float32); the variance is E[x^2] - E[x]^2 clipped at 0,
flax's default (`use_fast_variance`). Parameter names, shapes and partitioning are nn.GroupNorm's,
so checkpoints and exports are unchanged.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu")


def _group_stats(x: jax.Array, groups: int, eps: float):
  """(mean, rstd), each (N, G), over H, W and each group's channels; float32."""
  n, h, w, c = x.shape
  xg = x.astype(jnp.float32).reshape(n, h * w, groups, c // groups)
  mean = jnp.mean(xg, axis=(1, 3))
  var = jnp.maximum(jnp.mean(jnp.square(xg), axis=(1, 3)) - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + eps)


def _per_channel(s: jax.Array, c: int) -> jax.Array:
  """(N, G) -> (N, 1, 1, C): each group's value on its channels."""
  return jnp.repeat(s, c // s.shape[1], axis=1)[:, None, None, :]


def _normalise(x, mean, rstd):
  c = x.shape[-1]
  return (x.astype(jnp.float32) - _per_channel(mean, c)) * _per_channel(rstd, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def norm_affine_act(x: jax.Array, a: jax.Array, b: jax.Array, groups: int, eps: float,
                    act: Optional[str]) -> jax.Array:
  """act(GN(x) * a + b): x (N, H, W, C) any float dtype; a, b (N, C) float32 -> float32."""
  return _forward(x, a, b, groups, eps, act)[0]


def _forward(x, a, b, groups, eps, act):
  mean, rstd = _group_stats(x, groups, eps)
  y = _normalise(x, mean, rstd) * a[:, None, None, :] + b[:, None, None, :]
  return (jax.nn.silu(y) if act == "silu" else y), (x, mean, rstd, a, b)


def _backward(groups, eps, act, residuals, dout):
  del eps
  # The barrier keeps XLA from merging this recomputation with the forward's (CSE): merged, the
  # forward's sigmoid(y) became a stored activation, one more write and read per norm.
  x, mean, rstd, a, b = jax.lax.optimization_barrier(residuals)
  n, h, w, c = x.shape
  xhat = _normalise(x, mean, rstd)
  if act == "silu":  # silu'(y) = s (1 + y (1 - s)), s = sigmoid(y)
    y = xhat * a[:, None, None, :] + b[:, None, None, :]
    s = jax.nn.sigmoid(y)
    dy = dout * (s * (1.0 + y * (1.0 - s)))
  else:
    dy = dout
  da = jnp.sum(dy * xhat, axis=(1, 2))  # (N, C)
  db = jnp.sum(dy, axis=(1, 2))
  size = h * w * (c // groups)  # elements per group
  mean_dxhat = jnp.sum((a * db).reshape(n, groups, -1), axis=2) / size  # (N, G)
  mean_dxhat_xhat = jnp.sum((a * da).reshape(n, groups, -1), axis=2) / size
  dx = _per_channel(rstd, c) * (dy * a[:, None, None, :] - _per_channel(mean_dxhat, c)
                                - xhat * _per_channel(mean_dxhat_xhat, c))
  return dx.astype(x.dtype), da, db


norm_affine_act.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """GroupNorm (float32 statistics) with an optional per-example modulation and activation.

  `__call__(x, mul=None, add=None, act=None)` returns act((GN(x) * gamma + beta) * mul + add)
  in float32, with mul / add (N, C) or None (AdaGN: mul = 1 + s, add = b).
  """
  num_groups: int
  epsilon: float = 1e-5
  param_axes: Any = ("norm",)

  @nn.compact
  def __call__(self, x: jax.Array, mul: Optional[jax.Array] = None,
               add: Optional[jax.Array] = None, act: Optional[str] = None) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: num_groups={self.num_groups} does not divide the "
                       f"{c} channels of its input")
    if act not in ACTIVATIONS:
      raise ValueError(f"GroupNorm: act={act!r} is not one of {ACTIVATIONS}")
    gamma = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             self.param_axes), (c,), jnp.float32)
    beta = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           self.param_axes), (c,), jnp.float32)
    n = x.shape[0]
    a = jnp.broadcast_to(gamma, (n, c))
    b = jnp.broadcast_to(beta, (n, c))
    if mul is not None:  # (x gamma + beta) m + t = x (gamma m) + (beta m + t)
      mul = mul.astype(jnp.float32)
      a, b = a * mul, b * mul
    if add is not None:
      b = b + add.astype(jnp.float32)
    return norm_affine_act(x, a, b, self.num_groups, self.epsilon, act)
