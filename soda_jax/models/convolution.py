"""The convolution every soda_jax conv layer calls: XLA's, with a fast weight gradient on CPU.

Why: XLA:CPU (jaxlib 0.10) lowers a conv's weight gradient to one convolution whose window is the
whole activation map and whose contraction runs over every example and pixel of the batch. When
that operand pair (input + output cotangent) outgrows the core's L2 cache the kernel slows down
4-5x: on an Intel Xeon (2 MiB L2), one core, batch 16, 3x3 convs at 32 px, 128 -> 128 took 172
ms against 33 ms for the forward conv, 256 -> 256 751 ms against 135 (docs/benchmarks.md,
"Session 25"). The same sum split over batch chunks that fit in L2,

    dW = sum_chunks  XLA's weight gradient (x[chunk], dY[chunk])

ran at 42 and 188 ms: close to the forward conv. So on CPU a conv whose batch does not fit is
differentiated chunk by chunk (`chunked_weight_grad`, at most MAX_CHUNKS per device); the forward
conv and the input gradient stay XLA's own, as does the weight gradient of any conv whose batch
fits in one chunk or would need oversized ones.

Sharding: the project splits batches over every device (`sharding.BATCH_AXES`), in contiguous
blocks. Chunk i takes rows [i * chunk, (i + 1) * chunk) of *each* device's block, so a device
only touches its own rows and XLA sums the chunks before its one all-reduce (no resharding;
tested).

On GPU/TPU (any backend but CPU) `conv_general_dilated` *is* `lax.conv_general_dilated`: their
weight gradients are fine and nothing here changes their programs. Convs this does not cover
(dilation, feature groups, layouts other than NHWC/HWIO, symbolic shapes of `jax.export`) also go
to lax unchanged.

The chunks are for YNNPACK, XLA:CPU's default convolution library. Where XLA runs convolutions on
its Eigen kernels instead (`cpu_devices.use_fastest_convolutions`, Intel and AMD CPUs), whose weight
gradient is as fast as their forward conv, `auto` keeps XLA's own gradient.
`SODA_CONV_WEIGHT_GRAD` = auto (default) | chunks | xla overrides the choice when a program is
traced, so the benchmark can time both sides; `SODA_CONV_L2_BYTES` pins the budget (the chunks,
and so the last bits of the sums, otherwise follow the machine). A chunked conv is a
`jax.custom_vjp`: reverse mode only (`jax.jvp` through it raises; nothing here uses forward mode).
"""
import functools
import math
import os
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from soda_jax import cpu_devices
from soda_jax.models import materialized_grad

_NHWC = ("NHWC", "HWIO", "NHWC")
_MODES = ("auto", "chunks", "xla")
ENV = "SODA_CONV_WEIGHT_GRAD"
L2_ENV = "SODA_CONV_L2_BYTES"  # pins the chunk budget (bitwise runs across machines)
_DEFAULT_L2 = 1024 ** 2  # where sysfs does not say
# Each chunk is one more conv in the program (~15-30 ms of compile each): at most this many per
# device and layer, the chunks grown to match. Chunks over OVERSIZE x the budget pay little
# (batch 16, 32 px, 128 -> 128, 2 MiB L2: 2 MiB chunks 42 ms, 4 MiB 92, 8 MiB 152, XLA's 172), so
# a conv that would need them keeps XLA's own gradient, and large CPU batches compile as before.
MAX_CHUNKS = 32
OVERSIZE = 2

Padding = Tuple[Tuple[int, int], ...]


def weight_grad_mode() -> str:
  """'chunks' or 'xla': what a conv traced now uses for its weight gradient."""
  mode = os.environ.get(ENV, "auto")
  if mode not in _MODES:
    raise ValueError(f"{ENV}={mode!r}: expected one of {_MODES}")
  if mode == "auto":
    # Measured (docs/benchmarks.md, session 25; batch 32, float32): CIFAR-10 peer network on 2
    # CPU devices 11.27 -> 8.79 s/step, on 1 device 9.88 (the earlier per-tap matmuls) -> 8.75 s;
    # the demo level on 2 devices (0.388 vs 0.380-0.393 s), on 1 device 0.59 -> 0.42 s. That
    # is YNNPACK's weight gradient. Eigen's (`cpu_devices.use_fastest_convolutions`) is already
    # at the forward's speed and chunks slow it down (one core, batch 16, 32 px, 256 -> 256:
    # 144 ms whole, 252 ms in chunks; session 27), so it keeps XLA's own.
    if jax.default_backend() != "cpu":
      return "xla"
    return "chunks" if ynnpack_convolutions() else "xla"
  return mode


def ynnpack_convolutions(xla_flags: Optional[str] = None) -> bool:
  """Whether XLA:CPU runs convolutions on YNNPACK (its default) under these XLA_FLAGS (default:
  the environment's, which XLA read when it started).

  `--xla_cpu_experimental_ynn_fusion_type` takes a list: "+kind" / "-kind" edit the default set
  (which holds individual_convolution), plain kinds replace it; the last setting wins.
  """
  value = cpu_devices.xla_flag_value(cpu_devices.YNN_FLAG, xla_flags)
  if value is None:
    return True
  kinds = [k.strip() for k in value.split(",") if k.strip()]
  if any(k[0] in "+-" for k in kinds):
    return "-individual_convolution" not in kinds
  return "individual_convolution" in kinds


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
  covered = (all(isinstance(d, int) for d in lhs.shape)  # not under shape polymorphism (export)
             and _is_nhwc(lhs, rhs, dimension_numbers) and _ones(lhs_dilation)
             and _ones(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
             and preferred_element_type is None)
  xla_conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  if not covered:
    return xla_conv(lhs, rhs)
  if mode == "xla":  # its weight gradient transposes the activation: from memory, not fused
    return materialized_grad.wrap(xla_conv)(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  shards, chunk = weight_grad_chunks(lhs.shape, rhs.shape, strides, pads, lhs.dtype)
  if shards * chunk >= lhs.shape[0]:  # the batch fits in one chunk: XLA's own gradient
    return _xla_conv(lhs, rhs, strides, pads, precision)
  return _conv_chunked_grad(lhs, rhs, strides, pads, precision, shards, chunk)


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


def l2_bytes() -> int:
  """The chunk budget: $SODA_CONV_L2_BYTES if set, else one core's L2 cache (sysfs)."""
  pinned = os.environ.get(L2_ENV)
  if pinned is not None:
    if not pinned.isdigit() or int(pinned) < 1:
      raise ValueError(f"{L2_ENV}={pinned!r}: expected a positive number of bytes")
    return int(pinned)
  return machine_l2_bytes()


@functools.lru_cache(maxsize=None)
def machine_l2_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
  """cpu0's L2 data (or unified) cache in bytes from Linux's sysfs; 1 MiB where it does not say."""
  try:
    entries = sorted(os.listdir(base))
  except OSError:
    return _DEFAULT_L2
  for entry in entries:
    try:
      level, kind, size = (_read(os.path.join(base, entry, f)) for f in ("level", "type", "size"))
    except OSError:
      continue
    if level == "2" and kind in ("Unified", "Data") and size[:-1].isdigit():
      return int(size[:-1]) * {"K": 1024, "M": 1024 ** 2}.get(size[-1], 1)
  return _DEFAULT_L2


def per_example_bytes(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                      pads: Padding, dtype) -> int:
  """Bytes of one example's input and output cotangent: what a chunk must fit in the budget."""
  _, h, w, cin = x_shape
  kh, kw, _, cout = w_shape
  ho = (h + sum(pads[0]) - kh) // strides[0] + 1
  wo = (w + sum(pads[1]) - kw) // strides[1] + 1
  return (h * w * cin + ho * wo * cout) * jnp.dtype(dtype).itemsize


def weight_grad_chunks(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                       pads: Padding, dtype, budget: int = 0) -> Tuple[int, int]:
  """(shards, chunk) for a conv of x (N, H, W, Cin) by w (kh, kw, Cin, Cout).

  shards: the device blocks the batch is split into (gcd of N and the device count, as
  `sharding.BATCH_AXES` splits batches over every device). chunk: examples of one block per
  weight-gradient conv: as many as fit their input and output cotangent in `budget` bytes
  (default `l2_bytes()`), at least 1, and enough for at most MAX_CHUNKS chunks; the whole block
  (XLA's own gradient) where the chunks would exceed OVERSIZE x the budget.
  """
  n = x_shape[0]
  per_example = per_example_bytes(x_shape, w_shape, strides, pads, dtype)
  shards = math.gcd(n, jax.device_count())
  local = n // shards
  budget = budget or l2_bytes()
  chunk = max(1, budget // per_example, -(-local // MAX_CHUNKS))
  if chunk >= local or chunk * per_example > OVERSIZE * budget:
    return shards, local
  return shards, chunk


def _xla_conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_chunked_grad(x, w, strides, pads, precision, shards, chunk):
  return _xla_conv(x, w, strides, pads, precision)


def _fwd(x, w, strides, pads, precision, shards, chunk):
  return _xla_conv(x, w, strides, pads, precision), (x, w)


def _bwd(strides, pads, precision, shards, chunk, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w, strides, pads, precision), x)
  (dx,) = input_vjp(g)
  dw = chunked_weight_grad(x, g, w, strides, pads, precision, shards, chunk)
  return dx, dw.astype(w.dtype)


_conv_chunked_grad.defvjp(_fwd, _bwd)


def chunked_weight_grad(x: jax.Array, g: jax.Array, w: jax.Array, strides: Sequence[int],
                        pads: Padding, precision, shards: int, chunk: int) -> jax.Array:
  """dL/dW (kh, kw, Cin, Cout): XLA's weight gradient of each batch chunk (in the conv's dtype),
  summed in float32.

  x (N, H, W, Cin) and its output cotangent g (N, Ho, Wo, Cout) are viewed as `shards`
  contiguous blocks of N / shards examples (the devices' blocks); chunk i holds examples
  [i * chunk, (i + 1) * chunk) of every block (the last one may be shorter).
  """
  n = x.shape[0]
  if n % shards:
    raise ValueError(f"batch {n} does not split into {shards} device blocks")
  local = n // shards
  xs = x.reshape(shards, local, *x.shape[1:])
  gs = g.reshape(shards, local, *g.shape[1:])
  total = None
  for i in range(0, local, chunk):
    size = min(chunk, local - i)
    xc = xs[:, i:i + size].reshape(shards * size, *x.shape[1:])
    gc = gs[:, i:i + size].reshape(shards * size, *g.shape[1:])
    _, w_vjp = jax.vjp(lambda w_, xc=xc: _xla_conv(xc, w_, strides, pads, precision), w)
    dw = w_vjp(gc)[0].astype(jnp.float32)
    total = dw if total is None else total + dw
  return total
