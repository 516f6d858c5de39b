"""How many CPU devices a CPU-only run splits its batch over, chosen from the machine.

XLA:CPU runs each device's program on its own, so a batch split over several host devices
keeps every core busy on small convolutions that one device's intra-op threads do not
parallelise well. One device per core was the fastest measured on the 2-core machines (demo
step, batch 64, AMD EPYC: 2 devices 0.44-0.52 s, 4 devices 0.58, 8 devices 0.59-0.65, 1 device
0.95; docs/benchmarks.md, session 16), so a CPU-only run that has not chosen a count gets one
device per usable core, as many as divide its batch (at most MAX_DEVICES). The count, and so
the last bits of a run's floats (summation order), follow the machine: pin it with XLA_FLAGS to
reproduce a run bitwise elsewhere. Several runs started side by side each take every core.

The count must be in XLA_FLAGS before JAX creates its CPU backend: `use_one_device_per_core`
is called by the CLI entry points before anything asks JAX for devices.

The same goes for which library runs the convolutions (`use_fastest_convolutions`). XLA:CPU
(jaxlib 0.10) hands them to YNNPACK by default; its Eigen kernels are the other choice. On the
Intel Xeons measured (AVX-512 + AMX) Eigen's 3x3 convs run their forward, input and weight
gradients at PyTorch's (oneDNN) speed where YNNPACK's are 20-60% slower at 256-512 channels, and
the CIFAR-10 peer step fell from 9.47 to 7.93 s (docs/benchmarks.md, session 27). On the AMD EPYC
(Zen 4, AVX-512) the two were level in session 21, before the optimization barriers below and the
allocator work; with today's code Eigen + the barriers take the peer step from 10.1-10.8 to
8.1-8.4 s and the demo's from 0.51-0.59 to 0.38-0.41 s ("Session 33"). So Intel and AMD get
Eigen; other CPUs (not measured) keep XLA's default. With YNNPACK the weight gradient runs in
`models/convolution.py`'s L2 chunks, with Eigen it is XLA's own.

And the allocator XLA's buffers come from (`use_fast_malloc`). A train step allocates and frees
GBs (XLA's buffers, Eigen's packing buffers: 76 MB each for the peer network's weight gradients)
through glibc's malloc, which maps large blocks fresh and unmaps them on free: the CIFAR-10 peer
step took ~660,000 page faults and 1.3 s of kernel time per step. glibc's
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` backs those blocks with transparent 2 MiB pages: peer
step 6.34 -> 5.66 s on 2 devices, demo 0.344 -> 0.315 s (Intel Xeon; docs/benchmarks.md,
"Session 29"); the zeroing of fresh pages still cost ~0.3 s of kernel time per 2-device peer
step. gperftools' tcmalloc, where the machine has it (Debian 12: libtcmalloc-minimal4),
keeps freed blocks for reuse: almost no faults after the first step, peer step -2% and compile
-15% against the huge pages, the demo's compile -15% (Intel Xeon; "Session 32"). The tunable and
LD_PRELOAD are read only when a process starts, so the CLI restarts itself once with them set.

And whether XLA keeps `lax.optimization_barrier`s up to fusion (`keep_optimization_barriers`),
which `models/materialized_grad.py` needs to keep norms' backward passes out of the weight
gradients' transposing copies (Intel Xeon: peer step -3 to -13%, demo -10%, "Session 30"; AMD
EPYC: peer step -7 to -9%, one run against three, "Session 33"), and `models/group_norm.py` to
compute its per-channel coefficients once instead of in every element.
"""
import ctypes.util
import importlib.metadata
import importlib.util
import math
import os
import pkgutil
import subprocess
import sys
from typing import Callable, Mapping, Optional

from absl import logging

FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8  # the most measured (the test suite's 8 fake devices)
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVS = f"{YNN_FLAG}=-individual_convolution"  # convolutions off YNNPACK: XLA's Eigen
# CPU vendors (/proc/cpuinfo's vendor_id) on which Eigen's convolutions were measured faster.
EIGEN_CONV_VENDORS = ("GenuineIntel", "AuthenticAMD")


def device_count(cores: int, batch_size: int) -> int:
  """The largest count <= min(cores, MAX_DEVICES) that divides batch_size (at least 1)."""
  if cores < 1 or batch_size < 1:
    raise ValueError(f"cores={cores} and batch_size={batch_size} must be >= 1")
  return max(n for n in range(1, min(cores, MAX_DEVICES) + 1) if batch_size % n == 0)


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


def _cgroup_cpu_limit() -> Optional[float]:
  """CPUs allowed by a container's CPU quota (cgroup v2 cpu.max or v1 cfs), None if unlimited."""
  try:
    quota, period = _read("/sys/fs/cgroup/cpu.max").split()  # v2: "max 100000" | "200000 100000"
  except (OSError, ValueError):
    try:
      quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # v1: -1 = unlimited
      period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    except OSError:
      return None
  try:
    return None if quota in ("max", "-1") else int(quota) / int(period)
  except ValueError:
    return None


def usable_cores() -> int:
  """Cores this process may use: its CPU affinity (Linux; else the machine's count), capped by
  a container's CPU quota."""
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)
  limit = _cgroup_cpu_limit()
  if limit is not None:
    cores = min(cores, max(1, math.ceil(limit)))
  return cores


def _accelerator_plugin() -> Optional[str]:
  """The name of an installed JAX GPU/TPU backend, if any (then JAX will not run on the CPU)."""
  if importlib.util.find_spec("libtpu") is not None:
    return "libtpu"
  for ep in importlib.metadata.entry_points(group="jax_plugins"):
    return ep.name
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    for mod in pkgutil.iter_modules(jax_plugins.__path__):
      return mod.name
  except ImportError:
    pass
  return None


def _cpu_backend_to_come(what: str) -> bool:
  """True when JAX will run on the CPU and has not created its backends yet (XLA_FLAGS can
  still take effect); otherwise logs why `what` is left as it is."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  first = platforms.split(",")[0].strip()
  if platforms and first != "cpu":
    return False
  plugin = None if first == "cpu" else _accelerator_plugin()  # JAX_PLATFORMS=cpu: CPU it is
  if plugin is not None:
    logging.info("JAX backend %r installed: %s left at its default", plugin, what)
    return False
  # Not imported: no backends yet, and nothing to import (JAX takes ~1.3 s, paid twice by a CLI
  # run that restarts itself, use_fast_malloc).
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  try:
    initialized = xla_bridge is not None and xla_bridge.backends_are_initialized()
  except AttributeError:  # private API moved: assume not yet (the CLI's case)
    initialized = False
  if initialized:
    logging.warning("JAX's backends already exist: %s left as it is", what)
    return False
  return True


def use_one_device_per_core(config) -> Optional[int]:
  """Set XLA_FLAGS' host device count for a CPU-only single-process run; returns the count set.

  One device per usable core, a divisor of `config.batch_size`; a mesh fixed in full
  (`config.mesh.shape` without -1) sets its own size instead. Leaves everything as it is
  (returns None) when the user chose a count in XLA_FLAGS, when JAX_PLATFORMS names another
  platform first, when a GPU/TPU backend is installed, when the batch or mesh is invalid (left
  to config_checks, which names the value), or when JAX's backends already exist (too late:
  said in a warning)."""
  if FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  batch_size = config.batch_size
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    return None
  mesh = tuple(config.mesh.shape) if "mesh" in config else (-1,)
  if not all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1)
             for d in mesh):
    return None
  if not _cpu_backend_to_come("CPU device count"):
    return None
  n = math.prod(mesh) if -1 not in mesh else device_count(usable_cores(), batch_size)
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}={n}".strip()
  logging.info("CPU-only run: the batch of %d split over %d CPU devices (one per core; set "
               "XLA_FLAGS=%s=N to choose)", batch_size, n, FLAG)
  return n


def cpu_vendor(path: str = "/proc/cpuinfo") -> str:
  """The CPU's vendor_id ("GenuineIntel", "AuthenticAMD", ...); "" where it cannot be read."""
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
          return value.strip()
  except OSError:
    pass
  return ""


def eigen_convs_for(vendor: str) -> bool:
  """Whether XLA's Eigen convolutions (not YNNPACK's) are the faster ones measured on `vendor`."""
  return vendor in EIGEN_CONV_VENDORS


def use_fastest_convolutions(vendor: Optional[str] = None) -> bool:
  """Put EIGEN_CONVS in XLA_FLAGS on CPUs where Eigen's convolutions were measured faster.

  Returns whether it did. Leaves everything as it is when XLA_FLAGS already sets YNN_FLAG (the
  user's choice), when the run is not CPU-only or JAX's backends already exist (as
  `use_one_device_per_core`), and on other vendors. `models/convolution.py` reads the same
  XLA_FLAGS to pick the weight gradient that goes with the library (XLA's own with Eigen, L2
  chunks with YNNPACK).
  """
  if YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
    return False
  vendor = cpu_vendor() if vendor is None else vendor
  if not eigen_convs_for(vendor) or not _cpu_backend_to_come("the convolution library"):
    return False
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {EIGEN_CONVS}".strip()
  logging.info("CPU-only run on %s: convolutions on XLA's Eigen kernels, not YNNPACK (set "
               "XLA_FLAGS=%s=... to choose)", vendor, YNN_FLAG)
  return True


def xla_flag_value(name: str, xla_flags: Optional[str] = None) -> Optional[str]:
  """The value XLA takes for flag `name` (its last setting) in these XLA_FLAGS (default: the
  environment's, which XLA read when it started); None where the flag is not set."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  value = None
  for item in flags.split():
    key, _, v = item.partition("=")
    if key == name:
      value = v
  return value


# XLA:CPU keeps `lax.optimization_barrier`s up to fusion (models/materialized_grad.py) only with
# its CSE-barrier expander off. Measured on the Intel Xeons (with Eigen's convolutions): the peer
# step 6.55-6.83 -> 6.13-6.28 s, the demo's 0.350-0.355 -> 0.324-0.331 s (docs/benchmarks.md,
# "Session 30"); on the AMD EPYC (Zen 4) with Eigen 8.93 -> 8.10-8.43 s ("Session 33"). Other
# CPUs are not measured, so left off.
PASSES_FLAG = "--xla_disable_hlo_passes"
KEEP_BARRIERS = f"{PASSES_FLAG}=cse_barrier_expander"
KEEP_BARRIERS_VENDORS = ("GenuineIntel", "AuthenticAMD")


def keep_optimization_barriers(vendor: Optional[str] = None) -> bool:
  """Put KEEP_BARRIERS in XLA_FLAGS on the CPUs where it was measured faster; returns whether it
  did. Leaves everything as it is when XLA_FLAGS already names PASSES_FLAG (the user's list),
  when the run is not CPU-only or JAX's backends already exist, and on other vendors."""
  if PASSES_FLAG in os.environ.get("XLA_FLAGS", ""):
    logging.info("XLA_FLAGS sets %s: XLA's barrier passes left to it", PASSES_FLAG)
    return False
  vendor = cpu_vendor() if vendor is None else vendor
  if vendor not in KEEP_BARRIERS_VENDORS or not _cpu_backend_to_come("XLA's barrier passes"):
    return False
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {KEEP_BARRIERS}".strip()
  logging.info("CPU-only run on %s: optimization barriers kept up to fusion (%s)", vendor,
               KEEP_BARRIERS)
  return True


TUNABLES = "GLIBC_TUNABLES"
HUGETLB = "glibc.malloc.hugetlb"  # 1: malloc'd memory advised for transparent huge pages
THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_PATH) -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"); "" if unknown."""
  try:
    text = _read(path)
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    return tuple(int(v) for v in version.split(".")[:2])
  except (AttributeError, ValueError, OSError):
    return None


def huge_pages_env(environ: Mapping[str, str], glibc: Optional[tuple],
                   thp: str) -> Optional[dict]:
  """The environment to restart with for huge pages, or None where there is nothing to do:
  not glibc >= 2.35, the kernel's THP "never" (or unknown), or GLIBC_TUNABLES already naming
  glibc.malloc.hugetlb (the user's choice, either way; it also ends the restart)."""
  tunables = environ.get(TUNABLES, "")
  if glibc is None or glibc < MIN_GLIBC or thp not in ("always", "madvise"):
    return None
  if any(t.partition("=")[0] == HUGETLB for t in tunables.split(":")):
    return None
  env = dict(environ)
  env[TUNABLES] = f"{tunables}:{HUGETLB}=1" if tunables else f"{HUGETLB}=1"
  return env


PRELOAD = "LD_PRELOAD"
TCMALLOC = "tcmalloc_minimal"  # gperftools' malloc (Debian 12: libtcmalloc-minimal4)


def _loader_cache() -> str:
  """`ldconfig -p`: the libraries the dynamic loader finds by soname; "" where it cannot run."""
  for exe in ("/sbin/ldconfig", "ldconfig"):
    try:
      return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10,
                            env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}).stdout
    except (OSError, subprocess.SubprocessError):
      continue
  return ""


def tcmalloc_library(cache: Callable[[], str] = _loader_cache) -> Optional[str]:
  """The soname of gperftools' tcmalloc where the dynamic loader finds it, else None.

  `ctypes.util.find_library` falls back to gcc's `-l` search (LIBRARY_PATH, a conda prefix) when
  the loader's cache misses, and a soname found that way may not load: only the cache's count.
  """
  listing = cache()
  if f"lib{TCMALLOC}.so" not in listing:  # the usual miss, without find_library's gcc search
    return None
  name = ctypes.util.find_library(TCMALLOC)
  return name if name is not None and f"\t{name} (" in listing else None


def tcmalloc_env(environ: Mapping[str, str],
                 library: Callable[[], Optional[str]] = tcmalloc_library) -> Optional[dict]:
  """The environment to restart with for tcmalloc, or None: LD_PRELOAD already set (to anything,
  empty included: the user's choice, which also ends the restart) or no tcmalloc installed."""
  if PRELOAD in environ:
    return None
  lib = library()
  if lib is None:
    return None
  env = dict(environ)
  env[PRELOAD] = lib
  return env


def fast_malloc_env(environ: Mapping[str, str],
                    library: Callable[[], Optional[str]] = tcmalloc_library) -> Optional[dict]:
  """`environ` with what a CPU process should start with: glibc's malloc on transparent huge
  pages (`huge_pages_env`) and tcmalloc preloaded where it is installed (`tcmalloc_env`; glibc's
  tunable then has no effect, but is set all the same so that each opt-out stays independent of
  the other). None where there is nothing to set. The CLI restarts into it (`use_fast_malloc`);
  the test suite starts its worker processes in it (tests/conftest.py)."""
  pages = huge_pages_env(environ, glibc_version(), thp_mode())
  if pages is None and PRELOAD in environ:  # nothing to set (the usual restarted process)
    return None
  return tcmalloc_env(pages or environ, library) or pages


def use_fast_malloc(execve: Callable[..., None] = os.execve,
                    library: Callable[[], Optional[str]] = tcmalloc_library) -> bool:
  """Restart this process (same interpreter, same command line) in `fast_malloc_env`, for a
  CPU-only run whose JAX has not started.
  Returns False where there is nothing to set, off Linux, in a notebook kernel or an interactive
  interpreter, and where JAX runs elsewhere or already runs; on a restart it does not return.
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0 keeps 4 KiB pages, LD_PRELOAD= (empty) glibc's malloc.
  """
  if not sys.platform.startswith("linux"):
    return False
  if "ipykernel" in sys.modules or sys.flags.interactive:  # never restart a notebook's kernel
    return False
  pages = huge_pages_env(os.environ, glibc_version(), thp_mode())
  if pages is None and PRELOAD in os.environ:  # nothing to set (the usual restarted process)
    return False
  if not _cpu_backend_to_come("the memory allocator"):  # before the loader-cache lookups
    return False
  env = fast_malloc_env(os.environ, library)
  if env is None:
    return False
  preload = env.get(PRELOAD) != os.environ.get(PRELOAD)
  argv = [sys.executable] + list(getattr(sys, "orig_argv", sys.argv))[1:]
  if preload:
    logging.info("CPU-only run: restarting with %s=%s (XLA's buffers from tcmalloc, reused across "
                 "steps; set %s= to keep glibc's malloc)%s", PRELOAD, env[PRELOAD], PRELOAD,
                 f" and {TUNABLES}={env[TUNABLES]}" if pages else "")
  else:
    logging.info("CPU-only run: restarting with %s=%s (XLA's buffers on transparent huge pages; "
                 "set %s=%s=0 to keep 4 KiB pages)", TUNABLES, env[TUNABLES], TUNABLES, HUGETLB)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, argv, env)
  return True  # only where `execve` is a stand-in that returns


def prepare_cpu(config) -> None:
  """What the CLI entry points call before JAX starts: the allocator (restarts the process once),
  the device count, the conv library and XLA's barrier passes."""
  use_fast_malloc()
  use_one_device_per_core(config)
  use_fastest_convolutions()
  keep_optimization_barriers()
