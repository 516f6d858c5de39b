"""The convolution every soda_jax conv layer calls: XLA's, with a fast weight gradient on CPU.

Why: XLA:CPU (jaxlib 0.10) lowers a conv's weight gradient to another convolution whose window is
the whole activation map (e.g. 32x32 with the batch as the contracted feature). Profiled on a
2-core AMD EPYC on one device, those convolutions took 5-22x the time of the forward conv they
differentiate: 42-47% of the demo's train step and 75% of the CIFAR-10 peer network's
(docs/benchmarks.md, "Where the train step's time goes"). The same sum, written as one matmul
per kernel tap over a shifted (strided) view of the padded input,

    dW[i, j] = sum_{n, y, x} xpad[n, s*y + i, s*x + j, :]^T  dY[n, y, x, :]     (Cin, Cout)

runs at matmul speed. The forward conv and the input gradient stay XLA's own: they are fast.

On GPU/TPU (any backend but CPU) `conv_general_dilated` *is* `lax.conv_general_dilated`: their
weight gradients are fine and nothing here changes their programs. Convs the tap form does not
cover (dilation, feature groups, layouts other than NHWC/HWIO) also go to lax unchanged.

The tap form pays when each device holds a large part of the batch: on a single CPU device. With
the batch split over several (fake) CPU devices, XLA's own weight gradient was faster, so `auto`
uses taps only on a one-device CPU process. `SODA_CONV_WEIGHT_GRAD` = auto (default) | taps |
xla overrides that when a program is traced, so the benchmark can time both sides.
"""
import functools
import os
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_MODES = ("auto", "taps", "xla")
ENV = "SODA_CONV_WEIGHT_GRAD"

Padding = Tuple[Tuple[int, int], ...]


def weight_grad_mode() -> str:
  """'taps' or 'xla': what a conv traced now uses for its weight gradient."""
  mode = os.environ.get(ENV, "auto")
  if mode not in _MODES:
    raise ValueError(f"{ENV}={mode!r}: expected one of {_MODES}")
  if mode == "auto":
    # Measured (docs/benchmarks.md): taps pay on one CPU device (demo 1.65 -> 1.41 s/step, the
    # CIFAR-10 peer network ~60 -> 24 s); with the batch split over 8 fake CPU devices each
    # device's weight gradient is small and XLA's own was faster (demo 1.13-1.19 vs 1.61-1.65 s).
    return "taps" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "xla"
  return mode


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return want == got


def _ones(x) -> bool:
  return x is None or all(int(v) == 1 for v in x)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int],
                         padding: Union[str, Sequence[Tuple[int, int]]],
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """Drop-in for `lax.conv_general_dilated` (what `flax.linen.Conv` calls)."""
  mode = weight_grad_mode()  # first, so a bad SODA_CONV_WEIGHT_GRAD fails on any conv
  covered = (_is_nhwc(lhs, rhs, dimension_numbers) and _ones(lhs_dilation)
             and _ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
             and preferred_element_type is None)
  if not covered or mode == "xla":
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_tap_grad(lhs, rhs, strides, pads, precision)


def _xla_conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_grad(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision)


def _fwd(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision), (x, w)


def _bwd(strides, pads, precision, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, pads, precision), x)
  (dx,) = input_vjp(g)
  return dx, tap_weight_grad(x, g, w.shape, strides, pads, precision).astype(w.dtype)


_conv_tap_grad.defvjp(_fwd, _bwd)


def tap_weight_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                    strides: Sequence[int], pads: Padding, precision=None) -> jax.Array:
  """dL/dW (kh, kw, Cin, Cout) of an NHWC/HWIO conv from its input x (N, H, W, Cin) and output
  cotangent g (N, Ho, Wo, Cout): kh*kw matmuls (N*Ho*Wo, Cin)^T @ (N*Ho*Wo, Cout), accumulated
  in float32."""
  kh, kw, cin, cout = kernel_shape
  sh, sw = strides
  n, ho, wo, _ = g.shape
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  g2 = g.reshape(n * ho * wo, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                       (1, sh, sw, 1))  # (N, Ho, Wo, Cin): the inputs tap (i, j) multiplies
      taps.append(lax.dot_general(view.reshape(n * ho * wo, cin), g2, (((0,), (0,)), ((), ())),
                                  precision=precision, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, cin, cout)
