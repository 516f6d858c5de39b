"""The CPU device count a CPU-only run picks from the machine (soda_jax/cpu_devices.py)."""
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
