"""A conv whose weight gradient is fast on XLA:CPU (opt-in via `config.cpu_fast_conv`).

XLA:CPU was measured (shared/CPU_NOTES.md) to compute a 3x3 conv's weight gradient ~20x slower
than its forward pass. Here the forward and the input gradient stay `lax.conv_general_dilated`;
the weight gradient is one `einsum('nhwc,nhwo->co')` per kernel tap over a shifted (strided)
slice of the padded input: kh*kw plain matmuls, which XLA:CPU runs at matmul speed, and no
im2col tensor. Only for 2-D NHWC/HWIO convs without dilation or groups (everything this
project's models use); anything else goes to lax unchanged. TPU/GPU convs are fast: leave it off.
On this project's whole train steps it did NOT pay off (demo 28x28: 2.84 vs 1.98 s/step, peer
2.3x slower; docs/benchmarks.md), so it stays an opt-in experiment, off by default.
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` (the signature `flax.linen.Conv` calls)."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and precision is None
           and preferred_element_type is None
           and all(d in (None, 1) for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
           and _is_nhwc(dimension_numbers))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


def _is_nhwc(dn) -> bool:
  if dn is None:
    return False
  if isinstance(dn, lax.ConvDimensionNumbers):
    return dn == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _DIMS)
  return tuple(dn) == _DIMS


def _lax_conv(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
  return _lax_conv(x, w, strides, pads)


def _fwd(x, w, strides, pads):
  return _lax_conv(x, w, strides, pads), (x, w)


def _bwd(strides, pads, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, w, strides, pads), x)
  (dx,) = vjp_x(g)
  kh, kw = w.shape[:2]
  sh, sw = strides
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  taps = []
  for i in range(kh):
    for j in range(kw):
      patch = lax.slice(xp, (0, i, j, 0),
                        (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                        (1, sh, sw, 1))  # (N, Ho, Wo, Cin)
      taps.append(jnp.einsum("nhwc,nhwo->co", patch, g))
  dw = jnp.stack(taps).reshape(w.shape).astype(w.dtype)
  return dx, dw


_conv.defvjp(_fwd, _bwd)
