"""compile_then_meet: with several processes, each new input signature is compiled, then every
process meets at a barrier, then it runs; the run itself reuses that compile. (The real
2-process behaviour is tests/test_multiprocess.py; here process_count and the barrier are faked.)"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax import multihost, sharding


@pytest.fixture
def compiles():
  """[number of XLA compiles so far in this test]."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield count
  jax.monitoring.unregister_event_duration_listener(listener)


def test_compile_then_meet_orders_compile_barrier_run(monkeypatch, compiles):
  events = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost, "barrier",
                      lambda name: events.append(("barrier", name, compiles[0])))

  @functools.partial(multihost.compile_then_meet, name="f")
  @functools.partial(jax.jit, static_argnames=("k",))
  def f(x, k):
    events.append(("trace", x.shape))
    return jnp.sin(x) * k

  x3, y3, x5 = np.ones(3, np.float32), np.zeros(3, np.float32), np.ones(5, np.float32)
  start = compiles[0]
  np.testing.assert_allclose(f(x3, k=2.0), 2 * np.sin(1.0) * np.ones(3), rtol=1e-6)
  after_first = compiles[0]
  f(y3, k=2.0)  # same signature: no compile, no barrier
  f(x5, k=2.0)  # new shape: compile + barrier again
  f(x5, k=3.0)  # new static argument: likewise
  barriers = [e for e in events if e[0] == "barrier"]
  assert [b[1] for b in barriers] == ["compiled/f"] * 3
  assert after_first - start == 1  # the call reused the AOT compile
  assert barriers[0][2] == after_first  # the barrier came after the compile, before the run
  assert [e for e in events if e[0] == "trace"] == [("trace", (3,)), ("trace", (5,)),
                                                    ("trace", (5,))]


def test_one_process_is_a_plain_call(monkeypatch):
  monkeypatch.setattr(multihost, "barrier", lambda name: (_ for _ in ()).throw(AssertionError))
  f = multihost.compile_then_meet(jax.jit(lambda x: x + 1), "g")
  assert int(f(np.int32(1))) == 2


def test_from_host_places_the_array_with_the_requested_sharding():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  for target in (sharding.batch_sharding(mesh), sharding.replicated(mesh)):
    y = sharding.from_host(x, target)
    assert y.sharding == target
    np.testing.assert_array_equal(np.asarray(y), x)
  # Each device holds exactly its slice of the batch.
  y = sharding.from_host(x, sharding.batch_sharding(mesh))
  assert sorted(s.data.shape for s in y.addressable_shards) == [(1, 3)] * 8


@pytest.mark.parametrize("n", [8, 5, 16])
def test_batch_from_host_pads_to_the_mesh_and_splits(n):
  """Eval batches (sample grids, reconstructions) are split over the devices, padded with
  zeros to a multiple of the mesh size; n says which rows are real."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  x = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 1
  y, m = sharding.batch_from_host(x, mesh)
  rows = -(-n // 8) * 8
  assert m == n and y.shape == (rows, 3) and y.sharding == sharding.batch_sharding(mesh)
  assert sorted(s.data.shape for s in y.addressable_shards) == [(rows // 8, 3)] * 8
  np.testing.assert_array_equal(np.asarray(y)[:n], x)
  assert not np.asarray(y)[n:].any()
  y, _ = sharding.batch_from_host(x, mesh, rows=24)  # a fixed shape for every chunk
  assert y.shape == (24, 3) and not np.asarray(y)[n:].any()
  for bad in (4, 20):  # below n; not a multiple of the mesh size
    with pytest.raises(ValueError, match=f"rows={bad} must be >= the batch"):
      sharding.batch_from_host(x, mesh, rows=bad)


@pytest.mark.parametrize("one_host", [True, False])
def test_share_cpu_compilation_cache_keys_and_binary_sharing(monkeypatch, one_host):
  """Multi-process CPU: the cache key's device part no longer hashes the per-process topology
  fingerprint (so every process computes process 0's key) but still the device count and the
  CPU; JAX's binary sharing is turned on only when all processes share one host and cache."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top

  def device_hash(devices):
    h = hashlib.sha256()
    cache_key._hash_accelerator_config(h, devices)
    return h.hexdigest()

  devices = np.array(jax.devices())
  monkeypatch.setattr(cache_key, "_hash_accelerator_config", cache_key._hash_accelerator_config)
  monkeypatch.setattr(multihost, "_shared", [])
  agreed = []
  monkeypatch.setattr(multihost, "_all_processes_agree",
                      lambda value, name: agreed.append((value, name)) or one_host)
  share = (jax.config.jax_share_binary_between_hosts,
           jax.config.jax_share_binary_between_hosts_timeout_ms)
  assert not multihost.share_cpu_compilation_cache("/c")  # one process: nothing changes
  before = device_hash(devices)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  try:
    assert not multihost.share_cpu_compilation_cache("")  # no cache: nothing to share
    assert multihost.share_cpu_compilation_cache("/c")
    assert multihost.share_cpu_compilation_cache("/d") and len(agreed) == 1  # decided once
    assert agreed[0][0].endswith("|/c")  # host|cache directory
    assert jax.config.jax_share_binary_between_hosts == one_host
    if one_host:
      assert jax.config.jax_share_binary_between_hosts_timeout_ms == (
          multihost.BARRIER_TIMEOUT_S * 1000)
    after = device_hash(devices)
    expected = hashlib.sha256(
        f"cpu:['cpu']:{devices.size}:2:{multihost._cpu_features()}".encode()).hexdigest()
    assert after == expected != before
    assert device_hash(devices[: devices.size // 2]) != after  # the device count still counts
  finally:
    jax.config.update("jax_share_binary_between_hosts", share[0])
    jax.config.update("jax_share_binary_between_hosts_timeout_ms", share[1])


class _FakeKeyValueStore:
  def __init__(self):
    self.values = {}

  def key_value_set(self, key, value):
    assert key not in self.values, key  # each key is written once
    self.values[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    assert timeout_ms > 0
    return self.values[key]


def test_computed_on_process_0_runs_once_and_every_process_returns_its_numbers(monkeypatch):
  """Process 0 computes and publishes; process 1 returns the same numbers (floats exactly,
  through JSON) without calling fn; one process just calls fn."""
  calls = []

  def fit():
    calls.append(jax.process_index())
    return {"probe_top1_h": 0.1 + 0.2, "knn_top1_z": 1 / 3}

  assert multihost.computed_on_process_0(fit, "probe") == fit() and calls == [0, 0]
  store = _FakeKeyValueStore()
  monkeypatch.setattr(multihost.distributed.global_state, "client", store)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  results = []
  for index in (0, 1):  # each fake process with its own key sequence, two evaluations each
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    monkeypatch.setattr(multihost, "_from_process_0_ids", itertools.count())
    results += [multihost.computed_on_process_0(fit, "probe") for _ in range(2)]
  assert calls == [0, 0, 0, 0]  # process 1 never fitted
  assert all(r == {"probe_top1_h": 0.1 + 0.2, "knn_top1_z": 1 / 3} for r in results)
  assert len(store.values) == 2  # a key per evaluation, not reused


def test_computed_on_process_0_failure_reaches_the_other_processes(monkeypatch):
  """fn failing on process 0 (or returning what JSON cannot hold) raises there and, with its
  reason, on the others at once, instead of leaving them waiting for a value."""
  store = _FakeKeyValueStore()
  monkeypatch.setattr(multihost.distributed.global_state, "client", store)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    monkeypatch.setattr(multihost, "_from_process_0_ids", itertools.count())
    with pytest.raises(ValueError if index == 0 else RuntimeError) as e:
      multihost.computed_on_process_0(lambda: int("x"), "probe")
    if index == 1:
      assert str(e.value).startswith("probe failed on process 0: ValueError: invalid literal")
    with pytest.raises(TypeError if index == 0 else RuntimeError, match="not JSON|TypeError"):
      multihost.computed_on_process_0(lambda: {"a": object()}, "probe")
