"""Test setup: 8 fake CPU devices (so sharding code runs on a real 2x4 mesh) and a
persistent compilation cache (the biggest lever on suite time, see docs/benchmarks.md).

XLA_FLAGS must be set before JAX is imported anywhere, hence at the top of conftest.
"""
import os

# LLVM level 0 instead of 3 for every test program: most of them run a few times, and XLA:CPU
# compiles them ~30% faster than at level 1 (the suite 722 -> 651 s on a 2-core AMD EPYC) for
# ~2x slower kernels; only XLA:CPU's LLVM passes change, not the HLO (docs/benchmarks.md, "Test
# suite", session 34). The few tests that run hundreds of steps take `optimized_kernels` below.
# Subprocesses inherit these flags, so they share the compilation cache with the test processes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The convolution library the CLI picks on this machine (Eigen's on Intel and AMD, YNNPACK's
# with L2 chunks elsewhere) and its barrier setting (cpu_devices.py), so the suite tests the path
# a run here takes.
from soda_jax import cpu_devices  # noqa: E402  pylint: disable=g-import-not-at-top

cpu_devices.use_fastest_convolutions()
cpu_devices.keep_optimization_barriers()
# The xdist workers start after this file is read (here, in the controller) and inherit its
# environment: they run on the allocator the CLI restarts into (tcmalloc where installed, else
# glibc's malloc on huge pages; the CLI's subprocesses keep it), where XLA compiles faster
# (docs/benchmarks.md, "Session 34"). With -n 0 only the test's subprocesses get it.
os.environ.update(cpu_devices.fast_malloc_env(os.environ) or {})

import functools  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ.get(
    "SODA_TEST_COMPILE_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"),
)
# Subprocesses (CLI tests, notebooks) read the same cache through the environment.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """`--dist loadgroup` for pytest 9: xdist 3.8 tags grouped tests by rewriting `item._nodeid`,
  which pytest 9 no longer reads (node ids live in `item._id`), so its groups were silently
  ignored (a module fixture was built once per worker). Same tag, set where pytest 9 reads it."""
  # Slow (end-to-end) tests first: xdist hands out work in collection order (grouped scopes
  # first), so a 200-s test collected late runs alone at the end while the other worker idles.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
  if not getattr(config.option, "loadgroup", False) or not items or not hasattr(items[0], "_id"):
    return
  from _pytest.nodeid import NodeId  # pylint: disable=g-import-not-at-top
  for item in items:
    groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
              for m in item.iter_markers("xdist_group")}
    if groups and "@" not in item.nodeid:
      tagged = f"{item.nodeid}@{'_'.join(sorted(groups))}"
      item._id = NodeId.parse(tagged)  # pylint: disable=protected-access


@pytest.fixture
def optimized_kernels(monkeypatch):
  """LLVM level 1 for the programs this test jits (the suite's is 0, above): for the tests that
  run a program for hundreds of steps, where faster kernels pay for the longer compile
  (in the suite at level 0 / with this: decoder-uses-z 84 / 35 s, demo-loss-falls 108 / 79 s,
  session 34). Only the top-level programs of soda_jax and the tests, jitted during the test:
  XLA takes compiler options only there, not on a jit nested in a traced function (optax's, or
  one created while tracing); programs jitted earlier keep their level. Two limits: a program
  this jits at top level and the test then calls inside another trace fails (XLA's check is at
  the call); and `train_step.programs` keeps what it built for a config in the process, so a
  later test of the same config would run it at level 1 (today no other test shares one)."""
  from jax._src import core  # pylint: disable=g-import-not-at-top

  jit = jax.jit

  def jit_at_level_1(fun=None, /, **kwargs):
    if fun is None:
      return functools.partial(jit_at_level_1, **kwargs)
    module = getattr(getattr(fun, "func", fun), "__module__", "") or ""
    if core.trace_state_clean() and module.split(".")[0] in ("soda_jax", "tests"):
      kwargs.setdefault("compiler_options", {"xla_backend_optimization_level": 1})
    return jit(fun, **kwargs)

  monkeypatch.setattr(jax, "jit", jit_at_level_1)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (minutes); still run in CI")


# Compile-time report: how much of each test's time is tracing, lowering and XLA compiling (or
# loading from the cache), summed from JAX's monitoring events in the process that ran the test
# (subprocesses not included) and shown at the end of the run beside pytest's --durations.
# 'lower' can include waiting for earlier asynchronously dispatched work to finish.
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_compile_seconds = dict.fromkeys(_COMPILE_EVENTS.values(), 0.0)
# XLA compile (or persistent-cache load) per program name: [count, seconds]. Which programs the
# suite compiles, and how often, is what decides where a shared config or fixture saves time.
_by_program = {}


def _on_duration(event, duration, fun_name=None, **_):
  kind = _COMPILE_EVENTS.get(event)
  if kind:
    _compile_seconds[kind] += duration
    if kind == "compile":
      entry = _by_program.setdefault(str(fun_name), [0, 0.0])
      entry[0] += 1
      entry[1] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  _compile_seconds.update(dict.fromkeys(_compile_seconds, 0.0))
  _by_program.clear()
  yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  report = (yield).get_result()
  if call.when == "teardown":  # setup + call + teardown; travels to the xdist controller
    report.user_properties.append(("jax_compile_s", dict(_compile_seconds)))
    report.user_properties.append(("jax_compile_by_program", dict(_by_program)))


def pytest_terminal_summary(terminalreporter):
  rows = [(sum(v.values()), r.nodeid, v)
          for reports in terminalreporter.stats.values() for r in reports
          for name, v in getattr(r, "user_properties", ()) if name == "jax_compile_s"]
  if not rows:
    return
  rows.sort(key=lambda row: -row[0])
  terminalreporter.write_sep("=", "JAX trace + lower + compile seconds per test (in-process)")
  for s, nodeid, v in rows[:15]:
    terminalreporter.write_line(f"{s:7.1f}s (trace {v['trace']:.1f}, lower {v['lower']:.1f}, "
                                f"compile {v['compile']:.1f})  {nodeid}")
  totals = {k: sum(v[k] for _, _, v in rows) for k in _compile_seconds}
  terminalreporter.write_line("all tests: " + ", ".join(f"{k} {v:.0f} s" for k, v in totals.items()))
  programs = {}
  for reports in terminalreporter.stats.values():
    for r in reports:
      for name, v in getattr(r, "user_properties", ()):
        if name == "jax_compile_by_program":
          for fun, (n, s) in v.items():
            entry = programs.setdefault(fun, [0, 0.0])
            entry[0] += n
            entry[1] += s
  top = sorted(programs.items(), key=lambda kv: -kv[1][1])[:8]
  terminalreporter.write_line("compile (or cache load) by program: " + ", ".join(
      f"{fun} {n}x {s:.0f} s" for fun, (n, s) in top))
