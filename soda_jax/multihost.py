"""What several JAX processes must agree on, kept off the collectives backend.

A compiled program's first collective waits for every process that shares it. Processes
reach it as far apart as their compile times differ, and those differ a lot: only process 0
writes the persistent compilation cache, and a busy host compiles slower. On CPU the
collectives are gloo's, which fails a peer more than 30 s late ("Gloo context initialization
failed ... GetKeyValue() timed out"; seen in the 2-process test, docs/benchmarks.md). So every
program that spans processes is compiled first, then all processes meet at a barrier of the
coordination service (started by `jax.distributed.initialize`, timeout ours), then it runs.
"""
import hashlib
import itertools
import json
import os
import platform
import socket
import threading
import time
from typing import Any, Callable, List

from absl import logging
import jax
from jax._src import distributed  # the coordination-service client; no public handle yet

BARRIER_TIMEOUT_S = 1800  # one compile of the largest program on a slow host, with margin
_barrier_ids = itertools.count()  # the same sequence on every process: they run one program
# Persistent-cache hits per thread (JAX records the event on the thread that compiles, so an
# Orbax thread's compile cannot be counted as the main thread's).
_cache_hits = threading.local()


def _count_cache_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_hits":
    _cache_hits.n = getattr(_cache_hits, "n", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hits)


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  if jax.process_count() == 1:
    return
  barrier_id = f"soda/{name}/{next(_barrier_ids)}"  # a barrier id is used once
  distributed.global_state.client.wait_at_barrier(barrier_id, timeout_s * 1000)


def _cpu_features() -> str:
  """What a CPU executable depends on beyond the program: the instruction set it was built for
  (JAX's own key hashes it inside the topology fingerprint dropped below)."""
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    pass
  return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()}"


def _exchange(value: str, key: str) -> List[str]:
  """Every process's `value` for `key`, in process order, through the coordination service's
  key-value store (not the collectives). A key is written once: callers make it unique."""
  client = distributed.global_state.client
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  return [client.blocking_key_value_get(f"{key}/{i}", BARRIER_TIMEOUT_S * 1000)
          for i in range(jax.process_count())]


def _all_processes_agree(value: str, name: str) -> bool:
  """Whether every process passed the same `value`."""
  return all(v == value for v in _exchange(value, f"soda/{name}"))


_from_process_0_ids = itertools.count()  # the same sequence on every process


def computed_on_process_0(fn: Callable[[], Any], name: str) -> Any:
  """`fn()` computed on process 0 only; its JSON-able result reaches every other process
  through the coordination service's key-value store (no collectives).

  For host-local work whose inputs every process holds and whose result they all return: the
  end-of-run linear probe and k-NN fits on replicated features. Each process used to compile
  and fit the same probes; with several processes on one host (launch/local_multiprocess.sh)
  that is the same compile N times on shared cores. With one process: `fn()`.
  """
  if jax.process_count() == 1:
    return fn()
  client = distributed.global_state.client
  key = f"soda/from_process_0/{name}/{next(_from_process_0_ids)}"
  if jax.process_index() == 0:
    try:
      value = fn()
      message = json.dumps({"value": value})
    except Exception as e:  # the others stop now with its reason, not at the wait's timeout
      client.key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
      raise
    client.key_value_set(key, message)
    return value
  message = json.loads(client.blocking_key_value_get(key, BARRIER_TIMEOUT_S * 1000))
  if "error" in message:
    raise RuntimeError(f"{name} failed on process 0: {message['error']}")
  return message["value"]


_all_true_ids = itertools.count()  # the same sequence on every process


def all_true(ok: bool, name: str) -> bool:
  """True only if every process passed ok=True (`ok` itself with one process)."""
  if jax.process_count() == 1:
    return bool(ok)
  key = f"soda/all_true/{name}/{next(_all_true_ids)}"
  return all(v == "1" for v in _exchange("1" if ok else "0", key))


_shared = []  # [result] once decided: the key patch is process-wide, the exchange runs once


def share_cpu_compilation_cache(cache_dir: str) -> bool:
  """Compile each program once per multi-process CPU run, and load it from the cache after.

  JAX writes the persistent cache only from process 0, and on CPU each process computes a
  different key for the same program: the key hashes the device topology's fingerprint, which
  on CPU differs per process (measured: the only one of the key's eight parts that differs).
  So every other process recompiled every program at every start (~80 s for the tiny train
  step), and a restart after preemption cost a full compile. Here the key hashes instead what a
  CPU executable depends on: the kind and number of devices, the process count and the CPU's
  architecture and instruction-set flags. Processes reading one cache directory then load
  process 0's entries (programs over one process's own devices keep distinct keys: the device
  assignment is part of the key on CPU).

  When all processes are on one host and use one cache directory (so a cache hit on process 0
  is a hit everywhere), JAX's `share_binary_between_hosts` is turned on as well: on a miss
  process 0 compiles and hands the binary over, and the others wait instead of compiling the
  same program on the same cores. Across hosts it stays off: there process 0 could hit its own
  cache while another host misses and waits for a binary that is never sent.

  Returns whether the keys were changed (CPU, several processes, a cache directory, and JAX's
  private hook present; otherwise keys stay as JAX makes them, which is only slower). Decided
  once per process: later calls (a learning curve trains several runs) return that decision.
  """
  if jax.process_count() == 1 or jax.default_backend() != "cpu" or not cache_dir:
    return False
  if _shared:
    return _shared[0]
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top
  if not callable(getattr(cache_key, "_hash_accelerator_config", None)):
    logging.warning("jax._src.cache_key._hash_accelerator_config is gone in jax %s: processes "
                    "other than 0 will compile every program", jax.__version__)
    _shared.append(False)
    return False
  features = _cpu_features()

  def _hash_cpu_devices(hash_obj, devices) -> None:
    kinds = sorted({d.device_kind for d in devices.flat})
    hash_obj.update(f"cpu:{kinds}:{devices.size}:{jax.process_count()}:{features}".encode())

  cache_key._hash_accelerator_config = _hash_cpu_devices
  where = f"{socket.gethostname()}|{os.path.abspath(cache_dir)}"
  if _all_processes_agree(where, "compilation_cache_host"):
    jax.config.update("jax_share_binary_between_hosts", True)
    jax.config.update("jax_share_binary_between_hosts_timeout_ms", BARRIER_TIMEOUT_S * 1000)
  logging.info("Multi-process CPU: one compilation-cache key for all processes; binary sharing "
               "%s", "on (one host, one cache)" if jax.config.jax_share_binary_between_hosts
               else "off (several hosts or caches)")
  _shared.append(True)
  return True


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
        start, hits = time.perf_counter(), getattr(_cache_hits, "n", 0)
        jitted.lower(*args, **kwargs).compile()
        # Which processes compiled and which loaded from the cache: on a pod the waits at
        # the barrier below are the slowest process's compile.
        logging.info("%s: %s in %.1f s, process %d", name,
                     "loaded from the persistent cache" if getattr(_cache_hits, "n", 0) > hits
                     else "compiled (or received from process 0)",
                     time.perf_counter() - start, jax.process_index())
        barrier(f"compiled/{name}")
        seen.add(sig)
    return jitted(*args, **kwargs)

  call.lower = jitted.lower
  call.__wrapped__ = jitted
  return call
