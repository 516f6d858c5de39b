"""The CPU fast conv: same values and gradients as lax, for every conv shape the models use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from soda_jax.models import cpu_conv

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("kernel,stride,padding,hw", [
    (3, 1, "SAME", 8), (3, 2, "SAME", 7), (1, 1, "SAME", 5), (7, 2, ((3, 3), (3, 3)), 16),
    (3, 1, ((1, 1), (1, 1)), 6), (3, 2, ((1, 1), (1, 1)), 9)])
def test_matches_lax_values_and_gradients(kernel, stride, padding, hw):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, hw, hw, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 6))

  def f(impl):
    def loss(x, w):
      y = impl(x, w, (stride, stride), padding, dimension_numbers=DN)
      return jnp.sum(y * jax.random.normal(kg, y.shape))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)

  (v_ref, (dx_ref, dw_ref)) = f(lax.conv_general_dilated)
  (v, (dx, dw)) = f(cpu_conv.conv_general_dilated)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


def test_unsupported_cases_fall_through_to_lax():
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  y = cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                    feature_group_count=2)
  np.testing.assert_allclose(y, lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2))
