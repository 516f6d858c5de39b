"""What several JAX processes must agree on, kept off the collectives backend.

A compiled program's first collective waits for every process that shares it. Processes
reach it as far apart as their compile times differ, and those differ a lot: only process 0
reads and writes the persistent compilation cache, and a busy host compiles slower. On CPU the
collectives are gloo's, which fails a peer more than 30 s late ("Gloo context initialization
failed ... GetKeyValue() timed out"; seen in the 2-process test, docs/benchmarks.md). So every
program that spans processes is compiled first, then all processes meet at a barrier of the
coordination service (started by `jax.distributed.initialize`, timeout ours), then it runs.
"""
import itertools
from typing import Any, Callable

import jax
from jax._src import distributed  # the coordination-service client; no public handle yet

BARRIER_TIMEOUT_S = 1800  # one compile of the largest program on a slow host, with margin
_barrier_ids = itertools.count()  # the same sequence on every process: they run one program


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  if jax.process_count() == 1:
    return
  barrier_id = f"soda/{name}/{next(_barrier_ids)}"  # a barrier id is used once
  distributed.global_state.client.wait_at_barrier(barrier_id, timeout_s * 1000)


def _signature(args, kwargs) -> Any:
  """What decides whether jit compiles anew: array types (shape, dtype, weak type, sharding) and
  the *values* of everything else (static arguments). By value, never by `id` or a per-process
  hash, so that every process takes the same "new signature" decisions and meets at the same
  barriers."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  out = []
  for x in leaves:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      out.append((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                  getattr(x, "sharding", None)))
    else:
      try:
        hash(x)
      except TypeError as e:
        raise TypeError(f"compile_then_meet: argument {x!r} is neither an array nor "
                        "hashable") from e
      out.append(x)
  return treedef, tuple(out)


def compile_then_meet(jitted: Callable, name: str) -> Callable:
  """`jitted`, except that with several processes each new input signature is compiled first
  (`jitted.lower(...).compile()`, which the call then reuses) and followed by `barrier(name)`.
  One process: calls `jitted` directly (process_count is read at call time, so module-level
  wrappers work before `jax.distributed.initialize`)."""
  seen = set()

  def call(*args, **kwargs):
    if jax.process_count() > 1:
      sig = _signature(args, kwargs)
      if sig not in seen:
        jitted.lower(*args, **kwargs).compile()
        barrier(f"compiled/{name}")
        seen.add(sig)
    return jitted(*args, **kwargs)

  call.lower = jitted.lower
  return call
