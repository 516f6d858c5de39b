"""The conv with a per-tap weight gradient (models/convolution.py) against XLA's own."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from soda_jax.models import convolution, layers, resnet

_DN = ("NHWC", "HWIO", "NHWC")


def _loss(conv_fn, x, w, stride, padding, cot):
  y = conv_fn(x, w, (stride, stride), padding, dimension_numbers=_DN)
  return jnp.sum(y * cot)


def _grads(conv_fn, x, w, stride, padding):
  y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)
  cot = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  return jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=(0, 3, 4))(
      conv_fn, x, w, stride, padding, cot)


# (H, W, kernel, stride, padding): 'SAME' at stride 2 on an even size pads (0, 1), torchvision's
# explicit k // 2 pads both sides, 7x7/2 is the imagenet stem, 1x1/2 the downsample shortcut.
CASES = [(9, 9, 3, 1, "SAME"), (8, 8, 3, 2, "SAME"), (8, 8, 3, 2, ((1, 1), (1, 1))),
         (11, 10, 7, 2, ((3, 3), (3, 3))), (8, 8, 1, 1, "SAME"), (8, 8, 1, 2, ((0, 0), (0, 0))),
         (6, 6, 3, 1, "VALID")]


@pytest.mark.parametrize("h,w,k,stride,padding", CASES)
def test_tap_gradients_match_xla(h, w, k, stride, padding, monkeypatch):
  monkeypatch.setenv(convolution.ENV, "taps")
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, h, w, 3), jnp.float32)
  kern = jnp.asarray(rng.randn(k, k, 3, 5), jnp.float32)
  want_x, want_w = _grads(lax.conv_general_dilated, x, kern, stride, padding)
  got_x, got_w = _grads(convolution.conv_general_dilated, x, kern, stride, padding)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-4)
  assert got_w.shape == kern.shape and got_w.dtype == kern.dtype
  # The forward value itself is XLA's conv, bit for bit.
  y = convolution.conv_general_dilated(x, kern, (stride, stride), padding, dimension_numbers=_DN)
  np.testing.assert_array_equal(
      y, lax.conv_general_dilated(x, kern, (stride, stride), padding, dimension_numbers=_DN))


def _compiled_convs(mode, monkeypatch):
  """Convolutions in the compiled gradient of one layers.conv: forward + input gradient (+ the
  weight gradient when XLA computes it)."""
  monkeypatch.setenv(convolution.ENV, mode)
  mod = layers.conv(4)
  x = jnp.ones((2, 6, 6, 3), jnp.float32)
  params = mod.init(jax.random.PRNGKey(0), x)

  def loss(p, x):
    return jnp.sum(mod.apply(p, x) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  hlo = grad.lower(params, x).compile().as_text()
  return hlo.count(" convolution("), grad(params, x)


def test_weight_gradient_is_not_a_convolution_on_the_tap_path(monkeypatch):
  n_taps, g_taps = _compiled_convs("taps", monkeypatch)
  n_xla, g_xla = _compiled_convs("xla", monkeypatch)
  assert (n_taps, n_xla) == (2, 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_taps, g_xla)


def test_bfloat16_kernel_gets_a_bfloat16_gradient(monkeypatch):
  monkeypatch.setenv(convolution.ENV, "taps")
  x = jnp.ones((2, 6, 6, 3), jnp.bfloat16)
  w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  gw = jax.grad(lambda w: jnp.sum(convolution.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=_DN).astype(jnp.float32)))(w)
  assert gw.dtype == jnp.bfloat16
  # Interior taps see all 9 inputs of 1: every output pixel's cotangent is 1, so dW[i, j] counts
  # the output pixels whose tap (i, j) lands inside the 6x6 image: 2 images x 5 x 5 off-centre.
  assert float(gw[1, 1, 0, 0]) == 2 * 36 and float(gw[0, 0, 0, 0]) == 2 * 25


def test_mode_selection(monkeypatch):
  monkeypatch.delenv(convolution.ENV, raising=False)
  one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  assert convolution.weight_grad_mode() == ("taps" if one_cpu else "xla")  # 8 fake devices: xla
  monkeypatch.setenv(convolution.ENV, "fast")
  with pytest.raises(ValueError, match="SODA_CONV_WEIGHT_GRAD='fast'"):
    convolution.weight_grad_mode()


def test_uncovered_convs_are_xlas(monkeypatch):
  """Grouped or dilated convs keep lax's own gradient (the tap form does not cover them)."""
  monkeypatch.setenv(convolution.ENV, "taps")
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  f = lambda w: jnp.sum(convolution.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=2))
  jaxpr = str(jax.make_jaxpr(jax.grad(f))(w))
  assert jaxpr.count("dot_general[") == 0 and jaxpr.count("conv_general_dilated[") == 2


def test_resnet_convs_use_it(monkeypatch):
  monkeypatch.setenv(convolution.ENV, "taps")
  mod = resnet._conv(4, 3, 2, dtype=jnp.float32)  # pylint: disable=protected-access
  x = jnp.ones((1, 8, 8, 3))
  params = mod.init(jax.random.PRNGKey(0), x)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(mod.apply(p, x))))(params))
  assert jaxpr.count("dot_general[") == 9  # one matmul per tap of the 3x3 kernel


def test_auto_uses_taps_on_a_single_cpu_device():
  """The other side of `auto`: a process with one CPU device (no fake devices) traces taps."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", convolution.ENV)}
  out = subprocess.run(
      [sys.executable, "-c", "import jax; from soda_jax.models import convolution as c; "
       "print(jax.device_count(), c.weight_grad_mode())"],
      env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.split() == ["1", "taps"]
