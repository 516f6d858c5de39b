"""The decoder's 16-bit dropout (models/layers.py, `Dropout`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax.models import layers


def _apply(x, rate, seed=0, deterministic=False):
  return layers.Dropout(rate, deterministic=deterministic).apply(
      {}, x, rngs={"dropout": jax.random.PRNGKey(seed)})


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keeps_the_rate_and_scales_kept_values_by_the_rounded_keep_probability(rate):
  x = jnp.ones((8, 16, 16, 33))  # odd channels: the last word's high half is unused
  out = np.asarray(_apply(x, rate))
  keep_prob = 1 - round(rate * 65536) / 65536
  kept = out != 0
  np.testing.assert_array_equal(out[kept], np.float32(1 / keep_prob))
  # 67,584 draws: 5 standard deviations of the kept fraction is < 0.01.
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
  assert abs(out.mean() - 1.0) < 0.02  # unbiased


def test_halves_of_one_word_decide_different_elements_independently():
  # Low and high 16 bits of each word go to channel c and c + C/2: their masks must not agree
  # more often than independent coins (agreement 0.5 at rate 0.5).
  out = np.asarray(_apply(jnp.ones((64, 8, 8, 16)), 0.5)) != 0
  agree = (out[..., :8] == out[..., 8:]).mean()
  assert abs(agree - 0.5) < 0.01


def test_identity_when_deterministic_or_zero_rate_and_new_masks_per_key():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 8))
  np.testing.assert_array_equal(_apply(x, 0.3, deterministic=True), x)
  np.testing.assert_array_equal(_apply(x, 0.0), x)
  assert not np.array_equal(_apply(x, 0.3, seed=0) != 0, _apply(x, 0.3, seed=1) != 0)
  np.testing.assert_array_equal(_apply(x, 0.3, seed=4), _apply(x, 0.3, seed=4))


def test_gradient_is_the_same_mask_and_scale():
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 4, 4, 6))
  out = _apply(x, 0.25)
  grad = jax.grad(lambda x: jnp.sum(_apply(x, 0.25)))(x)
  np.testing.assert_array_equal(grad, jnp.where(out != 0, 1 / 0.75, 0.0))


def test_bad_rate_is_named():
  with pytest.raises(ValueError, match="rate=1.0 is not in"):
    _apply(jnp.ones((1, 2)), 1.0)
