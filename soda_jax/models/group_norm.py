"""The decoder's GroupNorm, with its affine, AdaGN modulation and SiLU in one custom-VJP op.

Why: autodiff of `silu((GN(x) * gamma + beta) * (1 + s) + b)` saves the normalised activations
and several intermediates of every norm for the backward pass, and XLA:CPU spends one loop fusion
per intermediate on them: GroupNorm + SiLU forward + gradient took 65 ms at (32, 32, 32, 256) on
2 CPU devices, against 25 ms written as below (docs/benchmarks.md, "Session 21"). Here the
per-(example, channel) scale and shift are folded into one `a`, `b` pair,

    out = act(xhat * a + b),   xhat = (x - mean_g) * rsqrt(var_g + eps)      (per group g)

and both directions work on per-(example, channel) coefficients (N, C) and per-channel sums:
the forward is `act(x * scale + shift)`, scale = rstd_g a, shift = b - mean_g scale, and the
backward recomputes y from x and the saved statistics (N, G), then needs two sums per channel
(of dy * x and of dy):

    db = sum_hw dy,  da = rstd (sum_hw dy * x - mean_g db)
    dx = rstd (dy a - mean_g(dy a) - xhat mean_g(dy a xhat)) = dy scale + x q + r

where both group means, and so q and r, come from da, db and a alone. Summing per channel first
(the contiguous axis) and materialising the (N, C) coefficients made this op 1.5-3.5x faster on
one CPU core than the per-group form it replaced (docs/benchmarks.md, "Session 31").
Statistics and output are float32 (as the flax GroupNorm it replaces, with dtype=float32); the
variance is E[x^2] - E[x]^2 clipped at 0, flax's default (`use_fast_variance`). Parameter names,
shapes and partitioning are nn.GroupNorm's, so checkpoints and exports are unchanged.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu")


def _group_stats(x: jax.Array, groups: int, eps: float):
  """(mean, rstd), each (N, G), over H, W and each group's channels; float32.

  Summed per channel first (a reduction over H*W that keeps the contiguous channel axis, which
  XLA:CPU vectorises), then per group: 2-5.5x faster on one CPU core than one reduction over the
  (H*W, channels-of-group) axes of an (N, H*W, G, C/G) view (docs/benchmarks.md, "Session 31").
  """
  _, h, w, c = x.shape
  xf = x.astype(jnp.float32)
  size = h * w * (c // groups)  # elements per group
  mean = _group_sum(jnp.sum(xf, axis=(1, 2)), groups) / size  # (N, G)
  mean_sq = _group_sum(jnp.sum(jnp.square(xf), axis=(1, 2)), groups) / size
  var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + eps)


def _per_channel(s: jax.Array, c: int) -> jax.Array:
  """(N, G) -> (N, C): each group's value on its channels."""
  return jnp.repeat(s, c // s.shape[1], axis=1)


def _group_sum(s: jax.Array, groups: int) -> jax.Array:
  """(N, C) -> (N, G): sums over each group's channels."""
  return jnp.sum(s.reshape(s.shape[0], groups, -1), axis=2)


def _materialized(coefficients):
  """Per-channel coefficients (N, C) computed once, not inside the (N, H, W, C) loops that use
  them: XLA:CPU otherwise fuses their arithmetic (and the group -> channel gather) into every
  element. The barrier needs `cpu_devices.KEEP_BARRIERS`; without it XLA drops it."""
  return jax.lax.optimization_barrier(coefficients)


def _bc(s: jax.Array) -> jax.Array:
  """(N, C) -> (N, 1, 1, C), to broadcast over H, W."""
  return s[:, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def norm_affine_act(x: jax.Array, a: jax.Array, b: jax.Array, groups: int, eps: float,
                    act: Optional[str]) -> jax.Array:
  """act(GN(x) * a + b): x (N, H, W, C) any float dtype; a, b (N, C) float32 -> float32."""
  return _forward(x, a, b, groups, eps, act)[0]


def _scale_shift(mean, rstd, a, b, c):
  """y = xhat * a + b as y = x * scale + shift, per (example, channel): (N, C) each."""
  rstd_c = _per_channel(rstd, c)
  scale = rstd_c * a
  return _materialized((scale, b - _per_channel(mean, c) * scale))


def _forward(x, a, b, groups, eps, act):
  mean, rstd = _group_stats(x, groups, eps)
  scale, shift = _scale_shift(mean, rstd, a, b, x.shape[-1])
  y = x.astype(jnp.float32) * _bc(scale) + _bc(shift)
  return (jax.nn.silu(y) if act == "silu" else y), (x, mean, rstd, a, b)


def _backward(groups, eps, act, residuals, dout):
  del eps
  # The barrier keeps XLA from merging this recomputation with the forward's (CSE): merged, the
  # forward's sigmoid(y) became a stored activation, one more write and read per norm.
  x, mean, rstd, a, b = jax.lax.optimization_barrier(residuals)
  n, h, w, c = x.shape
  xf = x.astype(jnp.float32)
  scale, shift = _scale_shift(mean, rstd, a, b, c)
  if act == "silu":  # silu'(y) = s (1 + y (1 - s)), s = sigmoid(y)
    y = xf * _bc(scale) + _bc(shift)
    s = jax.nn.sigmoid(y)
    dy = dout * (s * (1.0 + y * (1.0 - s)))
  else:
    dy = dout
  # Per-channel sums (N, C); xhat = (x - mean) * rstd itself is never formed:
  # da = rstd (sum dy x - mean sum dy).
  rstd_c, mean_c = _per_channel(rstd, c), _per_channel(mean, c)
  db = jnp.sum(dy, axis=(1, 2))
  da = rstd_c * (jnp.sum(dy * xf, axis=(1, 2)) - mean_c * db)
  size = h * w * (c // groups)  # elements per group
  mean_dxhat = _per_channel(_group_sum(a * db, groups) / size, c)  # (N, C)
  mean_dxhat_xhat = _per_channel(_group_sum(a * da, groups) / size, c)
  # dx = rstd (dy a - mean_dxhat - xhat mean_dxhat_xhat) = dy scale + x q + r, per channel:
  q, r = _materialized((-rstd_c * rstd_c * mean_dxhat_xhat,
                        rstd_c * (rstd_c * mean_c * mean_dxhat_xhat - mean_dxhat)))
  dx = dy * _bc(scale) + xf * _bc(q) + _bc(r)
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
