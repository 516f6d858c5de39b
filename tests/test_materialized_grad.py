"""models/materialized_grad.py: the same gradients, with the barriers XLA:CPU keeps on request."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from soda_jax import cpu_devices
from soda_jax.models import materialized_grad
from tests.test_config_checks import ROOT

_KEEP = cpu_devices.KEEP_BARRIERS


@pytest.mark.parametrize("flags,want", [
    ("", False),
    (_KEEP, True),
    (f"{cpu_devices.FLAG}=2 {_KEEP}", True),
    (f"{cpu_devices.PASSES_FLAG}=algsimp,cse_barrier_expander", True),
    (f"{cpu_devices.PASSES_FLAG}=algsimp", False),
    (f"{cpu_devices.PASSES_FLAG}=cse_barrier_expander_x", False),
    (f"{_KEEP} {cpu_devices.PASSES_FLAG}=algsimp", False),  # XLA takes the last setting
])
def test_barriers_kept_reads_xla_flags(flags, want):
  assert materialized_grad.barriers_kept(flags) is want


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_without_kept_barriers_fn_is_returned_unchanged(monkeypatch):
  # (barriers_kept is stubbed, not XLA_FLAGS: a backend created under a patched XLA_FLAGS would
  # lose this worker's 8 devices.)
  monkeypatch.setattr(materialized_grad, "barriers_kept", lambda: False)
  assert materialized_grad.wrap(_conv) is _conv


def test_gradients_are_the_vjp_of_fn(monkeypatch):
  """Values and both gradients of a conv whose input is a fused elementwise chain (the case the
  barrier is for) match plain autodiff; forward mode is not offered (custom VJP)."""
  monkeypatch.setattr(materialized_grad, "barriers_kept", lambda: True)
  wrapped = materialized_grad.wrap(_conv)
  assert wrapped is not _conv
  kx, kw, ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 6, 6, 4))
  w = jax.random.normal(kw, (3, 3, 4, 5))
  s = jax.random.normal(ks, (4,))
  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(jax.nn.silu(x * s), w)))
  v0, g0 = jax.jit(jax.value_and_grad(lambda x, w: loss(_conv, x, w), (0, 1)))(x, w)
  v1, g1 = jax.jit(jax.value_and_grad(lambda x, w: loss(wrapped, x, w), (0, 1)))(x, w)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError):
    jax.jvp(wrapped, (x, w), (x, w))


_PROBE = """
import jax, jax.numpy as jnp
from soda_jax.models import convolution
x = jnp.ones((2, 8, 8, 4)); w = jnp.ones((3, 3, 4, 4))
f = lambda x, w: convolution.conv_general_dilated(
    jax.nn.silu(x), w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
g = jax.jit(jax.grad(f, (0, 1)))
print(g.lower(x, w).compile().as_text().count("opt-barrier"), float(g(x, w)[1].sum()))
"""


def test_xla_keeps_the_barrier_only_with_the_flag():
  """The flag's pass name is XLA's: with it the compiled gradient holds the barrier, without it
  XLA drops the barrier (its usual program); the numbers are the same. A jaxlib that renames the
  pass fails here instead of silently losing the speed."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", SODA_CONV_WEIGHT_GRAD="xla")
  out = {}
  for name, flags in (("kept", _KEEP), ("dropped", "")):
    env["XLA_FLAGS"] = f"{cpu_devices.FLAG}=1 {cpu_devices.EIGEN_CONVS} {flags}".strip()
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
    out[name] = r.stdout.split()
  assert int(out["kept"][0]) >= 1
  assert int(out["dropped"][0]) == 0
  assert out["kept"][1] == out["dropped"][1]
