"""Programs that run once (parameter init) compiled without XLA:CPU's backend optimisation.

XLA:CPU spends most of a model init's compile time optimising the threefry random-bit generation
in LLVM, for a program that then runs once in milliseconds: the tiny config's init compiles in
29 s by default and 9 s at backend level 0 (AMD EPYC, docs/benchmarks.md). The values differ from
the optimised program's by rounding only (max relative difference 3e-7, in the float tail of
the initialisers). Other backends compile as usual.
"""
import functools
from typing import Any, Callable

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile(fn: Callable[..., Any], *args, **jit_kwargs) -> Callable[..., Any]:  # pylint: disable=redefined-builtin
  """`jax.jit(fn, **jit_kwargs)` compiled for `args`' shapes, cheaply on CPU (cached like any
  compile); the result can be called again with other values of the same shapes."""
  lowered = jax.jit(fn, **jit_kwargs).lower(*args)
  options = CPU_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)


def run(fn: Callable[..., Any], *args, **jit_kwargs) -> Any:
  """`jax.jit(fn, **jit_kwargs)(*args)`, compiled as `compile` does."""
  return compile(fn, *args, **jit_kwargs)(*args)


def init(model: Any, rng: jax.Array, **inputs) -> Any:
  """`jax.jit(model.init)(rng, **inputs)`, compiled as `run` does."""
  return run(functools.partial(model.init, **inputs), rng)  # named 'init' in compile reports
