"""Backward passes that read their operands from memory (CPU): `wrap(fn)`.

Why: XLA:CPU fuses cheap elementwise producers into their consumers, recomputing them there. A
weight gradient on CPU needs its operands transposed (Eigen's convolution wants the activation
channels-first, YNNPACK's dots want the cotangent transposed), so XLA recomputes a GroupNorm or
BatchNorm backward, or the activation it saved, inside the transposing copy, whose loop walks
its inputs out of order: on one core the CIFAR-10 peer step spent 1.4-1.6 of its 11.4-12.1 s
in transposing copies, 0.65-0.75 s of it in ones carrying fused elementwise work. An
optimization barrier on the operands and the cotangent makes XLA write them out first, in
order, and transpose the result: 1.1 s of copies, 0.35 s of them with fused work
(docs/benchmarks.md, "Session 30").

XLA:CPU drops optimization barriers before fusion unless its `cse_barrier_expander` pass is
disabled (`cpu_devices.KEEP_BARRIERS`, which `cpu_devices.keep_optimization_barriers` puts in
XLA_FLAGS for CPU-only CLI runs on the machines where it was measured faster). Without it
`wrap` returns `fn` unchanged (XLA would drop the barrier anyway), as it does on other backends.
"""
from typing import Callable, Optional

import jax
from jax import lax

from soda_jax import cpu_devices


def barriers_kept(xla_flags: Optional[str] = None) -> bool:
  """Whether XLA keeps optimization barriers under these XLA_FLAGS (default: the environment's)."""
  passes = cpu_devices.xla_flag_value(cpu_devices.PASSES_FLAG, xla_flags) or ""
  return "cse_barrier_expander" in passes.split(",")


def wrap(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """fn(*arrays) -> array, whose VJP takes fn's operands and cotangent through a barrier.

  The values are those of `jax.vjp(fn, ...)`; only XLA's fusion around them changes. Reverse
  mode only (a `jax.custom_vjp`). Applies on CPU when `barriers_kept()`, else returns fn.
  """
  if jax.default_backend() != "cpu" or not barriers_kept():
    return fn

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    return fn(*args), args

  def bwd(args, g):
    args, g = lax.optimization_barrier((args, g))
    return jax.vjp(fn, *args)[1](g)

  wrapped.defvjp(fwd, bwd)
  return wrapped
