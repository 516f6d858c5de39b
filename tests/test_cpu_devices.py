"""What a CPU-only run picks from the machine (cpu_devices.py): device count, conv library."""
import ctypes.util
import os
import subprocess
import sys

import ml_collections
import pytest

from soda_jax import cpu_devices
from tests.test_config_checks import ROOT


@pytest.mark.parametrize("cores,batch,want", [
    (2, 64, 2), (1, 64, 1), (3, 64, 2), (3, 48, 3), (16, 64, 8), (16, 24, 8), (16, 36, 6),
    (4, 7, 1), (2, 1, 1)])
def test_device_count_known_values(cores, batch, want):
  assert cpu_devices.device_count(cores, batch) == want


def test_device_count_rejects_nonsense():
  with pytest.raises(ValueError, match="cores=0"):
    cpu_devices.device_count(0, 64)


def _devices_after(env_extra, batch=64, mesh=(-1, 1)):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(env_extra, PYTHONPATH=ROOT)
  code = ("import os, jax, ml_collections; from soda_jax import cpu_devices; "
          f"c = ml_collections.ConfigDict(dict(batch_size={batch}, mesh=dict(shape={mesh}))); "
          "n = cpu_devices.use_one_device_per_core(c); "
          "print(n, jax.device_count(), os.environ.get('XLA_FLAGS', ''))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  n, count, flags = out.stdout.split(" ", 2)
  return n, int(count), flags.strip()


def test_cpu_only_run_gets_one_device_per_core():
  want = cpu_devices.device_count(cpu_devices.usable_cores(), 64)
  n, count, flags = _devices_after({})
  assert (n, count) == (str(want), want), (n, count, flags)
  assert flags == f"{cpu_devices.FLAG}={want}"


def test_a_chosen_count_is_kept():
  n, count, flags = _devices_after({"XLA_FLAGS": f"{cpu_devices.FLAG}=3"})
  assert (n, count, flags) == ("None", 3, f"{cpu_devices.FLAG}=3")


def test_other_xla_flags_are_kept_beside_the_count():
  want = cpu_devices.device_count(cpu_devices.usable_cores(), 64)
  _, count, flags = _devices_after({"XLA_FLAGS": "--xla_backend_optimization_level=1"})
  assert count == want
  assert flags == f"--xla_backend_optimization_level=1 {cpu_devices.FLAG}={want}"


def test_bad_batch_is_left_to_config_checks():
  n, count, _ = _devices_after({}, batch=0)
  assert (n, count) == ("None", 1)


@pytest.mark.parametrize("platforms,want_set", [("", False), ("cpu", True), ("cuda", False)])
def test_installed_accelerator_backend(monkeypatch, platforms, want_set):
  """With a GPU/TPU backend installed the count is left alone, unless JAX_PLATFORMS=cpu asks for
  the CPU. (In this process JAX already runs: its backend check is stubbed, XLA_FLAGS restored.)"""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  monkeypatch.setattr(cpu_devices, "_accelerator_plugin", lambda: "cuda12")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  c = ml_collections.ConfigDict(dict(batch_size=64, mesh=dict(shape=(-1, 1))))
  n = cpu_devices.use_one_device_per_core(c)
  want = cpu_devices.device_count(cpu_devices.usable_cores(), 64)
  assert n == (want if want_set else None)
  assert os.environ["XLA_FLAGS"] == (f"{cpu_devices.FLAG}={want}" if want_set else "")


def test_a_mesh_fixed_in_full_sets_the_count():
  n, count, _ = _devices_after({}, mesh=(2, 3), batch=12)
  assert (n, count) == ("6", 6)
  n, count, _ = _devices_after({}, mesh=(0, 2))  # invalid: left to config_checks
  assert (n, count) == ("None", 1)


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
  p = tmp_path / "cpuinfo"
  p.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
               "processor\t: 1\nvendor_id\t: AuthenticAMD\n")
  assert cpu_devices.cpu_vendor(str(p)) == "AuthenticAMD"
  assert cpu_devices.cpu_vendor(str(tmp_path / "missing")) == ""


_EIGEN = cpu_devices.EIGEN_CONVS


@pytest.mark.parametrize("vendor,flags,want", [
    ("GenuineIntel", "", _EIGEN),
    ("GenuineIntel", f"{cpu_devices.FLAG}=2", f"{cpu_devices.FLAG}=2 {_EIGEN}"),
    ("GenuineIntel", f"{cpu_devices.YNN_FLAG}=+eltwise", f"{cpu_devices.YNN_FLAG}=+eltwise"),
    ("AuthenticAMD", "", _EIGEN),
    ("", "", ""),  # vendor unknown: XLA's default (YNNPACK)
    ("CentaurHauls", "", ""),  # not measured: XLA's default
])
def test_the_conv_library_follows_the_vendor(monkeypatch, vendor, flags, want):
  """Eigen's convolutions where they were measured faster (Intel, AMD); a library the user chose in
  XLA_FLAGS is kept. (In this process JAX already runs: its backend check is stubbed.)"""
  monkeypatch.setattr(cpu_devices, "_cpu_backend_to_come", lambda what: True)
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert cpu_devices.use_fastest_convolutions(vendor) == (want != flags)
  assert os.environ["XLA_FLAGS"] == want


def test_the_conv_library_is_left_once_jax_runs(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # this process's backends exist (also when this test runs first): too late
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not cpu_devices.use_fastest_convolutions("GenuineIntel")
  assert os.environ["XLA_FLAGS"] == ""


def test_cli_setup_sets_count_and_library_together():
  """`prepare_cpu` (what the CLI entry points call) on this machine, in a fresh process."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=ROOT)
  code = ("import os, jax, ml_collections; from soda_jax import cpu_devices; "
          "from soda_jax.models import convolution; "
          "c = ml_collections.ConfigDict(dict(batch_size=64, mesh=dict(shape=(-1, 1)))); "
          "cpu_devices.prepare_cpu(c); "
          "print(jax.device_count(), convolution.weight_grad_mode(), os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  count, mode, flags = out.stdout.strip().split(" ", 2)
  n = cpu_devices.device_count(cpu_devices.usable_cores(), 64)
  eigen = cpu_devices.eigen_convs_for(cpu_devices.cpu_vendor())
  assert int(count) == n
  assert mode == ("xla" if eigen else "chunks")
  keep = cpu_devices.cpu_vendor() in cpu_devices.KEEP_BARRIERS_VENDORS
  assert flags == (f"{cpu_devices.FLAG}={n}" + (f" {_EIGEN}" if eigen else "")
                   + (f" {cpu_devices.KEEP_BARRIERS}" if keep else ""))


@pytest.mark.parametrize("vendor,flags,want", [
    ("GenuineIntel", "", cpu_devices.KEEP_BARRIERS),
    ("GenuineIntel", _EIGEN, f"{_EIGEN} {cpu_devices.KEEP_BARRIERS}"),
    ("GenuineIntel", f"{cpu_devices.PASSES_FLAG}=algsimp", f"{cpu_devices.PASSES_FLAG}=algsimp"),
    ("AuthenticAMD", "", cpu_devices.KEEP_BARRIERS),
    ("", "", ""),
    ("CentaurHauls", "", ""),  # not measured there
])
def test_barriers_are_kept_where_measured(monkeypatch, vendor, flags, want):
  """The barrier pass is switched off on the vendors measured faster; a pass list the user gave
  in XLA_FLAGS is kept as it is. (JAX's backend check stubbed, as above.)"""
  monkeypatch.setattr(cpu_devices, "_cpu_backend_to_come", lambda what: True)
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert cpu_devices.keep_optimization_barriers(vendor) == (want != flags)
  assert os.environ["XLA_FLAGS"] == want


def test_barriers_are_left_once_jax_runs(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not cpu_devices.keep_optimization_barriers("GenuineIntel")
  assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("environ,glibc,thp,want", [
    ({}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
    ({}, (2, 35), "always", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, (2, 36), "madvise",
     "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise", None),  # restarted
    ({}, (2, 34), "madvise", None),  # glibc without the tunable
    ({}, None, "madvise", None),  # not glibc (musl, ...)
    ({}, (2, 36), "never", None),
    ({}, (2, 36), "", None),  # no THP in this kernel
])
def test_huge_pages_env(environ, glibc, thp, want):
  env = cpu_devices.huge_pages_env(dict(environ, KEEP="1"), glibc, thp)
  if want is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == want and env["KEEP"] == "1"


def test_thp_mode_is_read_from_sysfs(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert cpu_devices.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert cpu_devices.thp_mode(str(path)) == "always"
  assert cpu_devices.thp_mode(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("environ,library,want", [
    ({}, "libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so.4"),
    ({}, None, None),  # not installed
    ({"LD_PRELOAD": ""}, "libtcmalloc_minimal.so.4", None),  # opted out (glibc's malloc)
    ({"LD_PRELOAD": "libjemalloc.so.2"}, "libtcmalloc_minimal.so.4", None),  # the user's
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "libtcmalloc_minimal.so.4", None),  # restarted
])
def test_tcmalloc_env(environ, library, want):
  env = cpu_devices.tcmalloc_env(dict(environ, KEEP="1"), lambda: library)
  if want is None:
    assert env is None
  else:
    assert env["LD_PRELOAD"] == want and env["KEEP"] == "1"


def _after_fast_malloc(env_extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "GLIBC_TUNABLES", "LD_PRELOAD")}
  env.update(env_extra, PYTHONPATH=ROOT)
  code = ("import os, sys; from soda_jax import cpu_devices; r = cpu_devices.use_fast_malloc(); "
          "maps = open('/proc/self/maps').read(); "
          "print(r, os.environ.get('GLIBC_TUNABLES'), os.environ.get('LD_PRELOAD'), "
          "'tcmalloc' in maps, sys.argv[1:])")
  out = subprocess.run([sys.executable, "-c", code, "--an=arg"], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.strip().splitlines()


def test_cli_restarts_once_with_huge_pages_and_tcmalloc_where_the_machine_has_them():
  pages = cpu_devices.huge_pages_env({}, cpu_devices.glibc_version(),
                                     cpu_devices.thp_mode()) is not None
  lib = cpu_devices.tcmalloc_library()
  tunables = "glibc.malloc.arena_max=8" + (":glibc.malloc.hugetlb=1" if pages else "")
  lines = _after_fast_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"})
  # One line: the first process was replaced (its print never ran); the restarted one has the
  # tunable, tcmalloc mapped where installed, the same arguments, and does not restart again.
  assert lines == [f"False {tunables} {lib} {lib is not None} ['--an=arg']"]
  # The user's choices are kept: 4 KiB pages, glibc's malloc.
  assert _after_fast_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LD_PRELOAD": ""}) == [
      "False glibc.malloc.hugetlb=0  False ['--an=arg']"]
  assert _after_fast_malloc({"JAX_PLATFORMS": "tpu"}) == ["False None None False ['--an=arg']"]


def test_huge_pages_are_left_once_jax_runs(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # this test process's backends exist
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setattr(cpu_devices, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(cpu_devices, "thp_mode", lambda path=None: "madvise")
  calls = []
  assert not cpu_devices.use_fast_malloc(execve=lambda *a: calls.append(a), library=lambda: None)
  assert not calls
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # tcmalloc alone: left too,
  monkeypatch.delenv("LD_PRELOAD", raising=False)  # without looking it up
  looked = []
  assert not cpu_devices.use_fast_malloc(execve=lambda *a: calls.append(a),
                                         library=lambda: looked.append(1) or "libtcmalloc.so")
  assert not calls and not looked


def test_tcmalloc_library_counts_only_the_loaders_cache(monkeypatch):
  listed = ("\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => "
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
  monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libtcmalloc_minimal.so.4")
  assert cpu_devices.tcmalloc_library(lambda: listed) == "libtcmalloc_minimal.so.4"
  assert cpu_devices.tcmalloc_library(lambda: "") is None  # gcc's -l search found it, not ld.so
  monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
  assert cpu_devices.tcmalloc_library(lambda: listed) is None


def test_huge_pages_restart_passes_the_command_line_and_spares_notebooks(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.setattr(cpu_devices, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(cpu_devices, "thp_mode", lambda path=None: "madvise")
  monkeypatch.setattr(cpu_devices, "_cpu_backend_to_come", lambda what: True)
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "soda_jax.main", "--config=c.py"])
  monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
  calls = []
  assert cpu_devices.use_fast_malloc(execve=lambda *a: calls.append(a), library=lambda: None)
  (exe, argv, env), = calls
  assert exe == sys.executable and argv == [sys.executable, "-m", "soda_jax.main", "--config=c.py"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert "LD_PRELOAD" not in env
  calls.clear()  # tcmalloc installed: one restart, both set
  assert cpu_devices.use_fast_malloc(execve=lambda *a: calls.append(a),
                                     library=lambda: "libtcmalloc_minimal.so.4")
  (_, _, env), = calls
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # no huge pages to add
  calls.clear()
  assert cpu_devices.use_fast_malloc(execve=lambda *a: calls.append(a),
                                     library=lambda: "libtcmalloc_minimal.so.4")
  (_, _, env), = calls
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
  monkeypatch.setitem(sys.modules, "ipykernel", object())  # a Jupyter/Colab kernel
  calls.clear()
  assert not cpu_devices.use_fast_malloc(execve=lambda *a: calls.append(a), library=lambda: None)
  assert not calls


def test_fast_malloc_env_is_what_the_cli_restarts_into(monkeypatch):
  """The environment the test workers start in (conftest) and the CLI restarts into: huge pages
  and tcmalloc added, the user's settings kept, None once both are settled."""
  monkeypatch.setattr(cpu_devices, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(cpu_devices, "thp_mode", lambda path=None: "madvise")
  lib = lambda: "libtcmalloc_minimal.so.4"  # noqa: E731
  env = cpu_devices.fast_malloc_env({"KEEP": "1"}, lib)
  assert env == {"KEEP": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                 "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
  assert cpu_devices.fast_malloc_env(env, lib) is None  # a worker or restarted process
  assert cpu_devices.fast_malloc_env({}, lambda: None) == {
      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert cpu_devices.fast_malloc_env({"LD_PRELOAD": ""}, lib) == {  # glibc's malloc kept
      "LD_PRELOAD": "", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  monkeypatch.setattr(cpu_devices, "thp_mode", lambda path=None: "never")
  assert cpu_devices.fast_malloc_env({}, lib) == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
