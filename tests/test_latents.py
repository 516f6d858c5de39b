"""Latent arithmetic for exploration: slices cover z exactly, swaps change one group only."""
import numpy as np
import pytest

from soda_jax import config_base
from soda_jax.evaluate import latents
from soda_jax.models import soda


def _model(modulation="layer", latent_dim=11):
  m = config_base.model_config("tiny")
  m.latent_dim, m.modulation = latent_dim, modulation
  return soda.build_model(m, image_channels=1)


def test_subvector_slices_tile_z_in_modulation_order():
  """SODA.subvector_slices is the split modulations() feeds the decoder."""
  model = _model()  # tiny: 2 levels -> 3 groups; 11 = 4 + 4 + 3
  assert model.subvector_slices == [slice(0, 4), slice(4, 8), slice(8, 11)]
  # The same split the decoder uses.
  z = np.arange(11, dtype=np.float32)[None]
  subs = [np.asarray(s) for s, _ in model.modulations(z, np.ones((1, 3), bool))]
  for part, sub in zip(model.subvector_slices, subs):
    np.testing.assert_array_equal(z[:, part], sub)
  assert _model("global").subvector_slices == [slice(0, 11)]


def test_swap_changes_exactly_one_group_per_row():
  model = _model()
  z_a, z_b = np.zeros(11, np.float32), np.ones(11, np.float32)
  swapped = latents.swap_subvectors(z_a, z_b, model)
  assert swapped.shape == (3, 11)
  for row, part in zip(swapped, model.subvector_slices):
    expected = z_a.copy()
    expected[part] = 1.0
    np.testing.assert_array_equal(row, expected)


def test_interpolate_ends_and_steps():
  z_a, z_b = np.array([0.0, 2.0]), np.array([4.0, -2.0])
  path = latents.interpolate(z_a, z_b, 5)
  np.testing.assert_allclose(path, [[0, 2], [1, 1], [2, 0], [3, -1], [4, -2]])
  with pytest.raises(ValueError, match="num=1"):
    latents.interpolate(z_a, z_b, 1)


def test_traverse_moves_one_subvector_by_its_scaled_steps():
  model = _model()  # groups of 4, 4, 3
  z = np.arange(11, dtype=np.float32)
  scale = np.full(11, 0.5, np.float32)
  out = latents.traverse_subvectors(z, scale, model, steps=(-2.0, 0.0, 1.0))
  assert out.shape == (3, 3, 11)
  for s, step in enumerate((-2.0, 0.0, 1.0)):
    for k, part in enumerate(model.subvector_slices):
      expected = z.copy()
      expected[part] += 0.5 * step
      np.testing.assert_array_equal(out[s, k], expected)
  np.testing.assert_array_equal(out[1], np.stack([z] * 3))  # step 0: z itself
  with pytest.raises(ValueError, match=r"z \(10,\) and scale \(11,\) must both be \(11,\)"):
    latents.traverse_subvectors(z[:10], scale, model)
