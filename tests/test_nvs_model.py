"""3-D conditioning of the model: ray pose maps (target camera), source rays at the encoder
input, and several source views averaged into one latent."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax import compile_once, config_base
from soda_jax.data import cameras
from soda_jax.models import layers, soda
from tests.random_params import perturbed

IMG, B, FREQS = 16, 2, 2
# One xdist worker runs this module: the lru-cached model is initialised once.
pytestmark = pytest.mark.xdist_group("nvs_model")


@functools.lru_cache(maxsize=None)
def _rays_model():
  m = config_base.model_config("tiny")
  m.pose = "rays"
  m.ray_freqs = FREQS
  model = soda.build_model(m, image_channels=3)
  inputs = soda.init_inputs(B, IMG, 3, model.num_subvectors)
  variables = nn.meta.unbox(compile_once.init(model, jax.random.PRNGKey(0), **inputs))
  return model, {"params": perturbed(variables["params"])}


def _rays(seed):
  """Real ray maps of two ring cameras (Plucker), different per seed."""
  w2c = cameras.ring_cameras(8, (20.0,))[[seed % 8, (seed + 3) % 8]]
  k = cameras.intrinsics_from_fov(30.0, IMG, IMG)
  return jnp.asarray(cameras.ray_map(w2c, k, IMG, IMG))  # (2, H, W, 6)


def test_ray_pose_map_values_and_channels():
  rays = _rays(0)
  ch = layers.ray_channels(FREQS)
  assert ch == 6 * (1 + 2 * FREQS) == 30
  assert soda.pose_channels("rays", FREQS) == ch + 1 and soda.pose_channels("box") == 3
  pm = layers.rays_to_pose_map(rays, jnp.array([True, False]), FREQS)
  assert pm.shape == (B, IMG, IMG, ch + 1)
  np.testing.assert_array_equal(pm[0, ..., :6], rays[0])  # the raw rays come first
  np.testing.assert_allclose(pm[0, ..., 6:12], np.sin(np.pi * rays[0]), atol=1e-6)
  np.testing.assert_array_equal(pm[0, ..., -1], 1.0)  # validity channel
  np.testing.assert_array_equal(pm[1], 0.0)  # dropped: zeros, validity 0 included


def test_rays_model_input_channels():
  model, variables = _rays_model()
  p = variables["params"]
  # Decoder: x_t (3) + embedded target rays (30) + validity (1); encoder: image + source rays.
  assert p["decoder"]["conv_in"]["kernel"].shape[2] == 3 + 30 + 1
  assert p["encoder"]["conv1"]["kernel"].shape[2] == 3 + 30


def test_dropped_ray_pose_is_bitwise_independent_of_target_rays():
  model, variables = _rays_model()
  x_t = jax.random.normal(jax.random.PRNGKey(1), (B, IMG, IMG, 3))
  t = jnp.full((B,), 0.5)
  z = jax.random.normal(jax.random.PRNGKey(2), (B, model.latent_dim))
  keep = jnp.ones((B, model.num_subvectors), bool)
  run = jax.jit(lambda rays, pk: model.apply(variables, x_t, t, z, keep, None, pk,
                                             target_rays=rays, method=soda.SODA.denoise))
  on, off = jnp.ones((B,), bool), jnp.zeros((B,), bool)
  a, b = _rays(0), _rays(5)
  np.testing.assert_array_equal(run(a, off), run(b, off))
  np.testing.assert_array_equal(run(a, off), run(jnp.full_like(a, jnp.nan), off))
  diff = float(jnp.max(jnp.abs(run(a, on) - run(b, on))))
  assert diff > 1e-3, diff  # kept: the target camera changes the prediction


def test_source_rays_reach_z():
  model, variables = _rays_model()
  src = jax.random.uniform(jax.random.PRNGKey(3), (B, IMG, IMG, 3), minval=-1, maxval=1)
  enc = jax.jit(lambda x, r: model.apply(variables, x, source_rays=r,
                                         method=soda.SODA.encode)[1])
  assert float(jnp.max(jnp.abs(enc(src, _rays(0)) - enc(src, _rays(5))))) > 1e-4


def test_several_source_views_average_into_one_latent():
  """K identical views -> the single-view z; a permutation of the K views -> the same z."""
  model, variables = _rays_model()
  k = 3
  views = jax.random.uniform(jax.random.PRNGKey(4), (B, k, IMG, IMG, 3), minval=-1, maxval=1)
  rays = jnp.stack([_rays(s) for s in range(k)], axis=1)  # (B, K, H, W, 6)
  enc = jax.jit(lambda x, r: model.apply(variables, x, source_rays=r,
                                         method=soda.SODA.encode))
  h1, z1 = enc(views[:, 0], rays[:, 0])
  hk, zk = enc(jnp.repeat(views[:, :1], k, axis=1), jnp.repeat(rays[:, :1], k, axis=1))
  assert zk.shape == (B, model.latent_dim) and hk.shape == h1.shape
  np.testing.assert_allclose(zk, z1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hk, h1, rtol=1e-5, atol=1e-5)
  _, z_all = enc(views, rays)
  perm = jnp.array([2, 0, 1])
  _, z_perm = enc(views[:, perm], rays[:, perm])
  np.testing.assert_allclose(z_perm, z_all, rtol=1e-5, atol=1e-5)
  # ... and it is the mean of the per-view latents, not one of them.
  per_view = [enc(views[:, i], rays[:, i])[1] for i in range(k)]
  np.testing.assert_allclose(z_all, np.mean(per_view, axis=0), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(z_all - per_view[0]))) > 1e-4


def test_source_mask_averages_only_the_counted_views():
  """z of K views with the first k counted == z of those k views alone (eval mode: no view
  reaches another through BatchNorm); the masked views' pixels do not matter; a mask of the
  wrong shape is refused."""
  model, variables = _rays_model()
  k_views = 3
  views = jax.random.uniform(jax.random.PRNGKey(5), (B, k_views, IMG, IMG, 3), minval=-1,
                             maxval=1)
  rays = jnp.stack([_rays(s) for s in range(k_views)], axis=1)
  enc = jax.jit(lambda x, r, m: model.apply(variables, x, source_rays=r, source_mask=m,
                                            method=soda.SODA.encode))
  enc_all = jax.jit(lambda x, r: model.apply(variables, x, source_rays=r,
                                             method=soda.SODA.encode))
  mask = jnp.array([[True, False, False], [True, True, False]])
  h, z = enc(views, rays, mask)
  for b, k in enumerate((1, 2)):
    hk, zk = enc_all(views[b:b + 1, :k], rays[b:b + 1, :k])
    np.testing.assert_allclose(z[b], zk[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[b], hk[0], rtol=1e-5, atol=1e-5)
  garbage = views.at[:, 2].set(jnp.nan).at[0, 1].set(jnp.nan)
  np.testing.assert_array_equal(enc(garbage, rays, mask)[1], z)  # weight 0: not even NaN leaks
  _, z_all = enc(views, rays, jnp.ones((B, k_views), bool))
  np.testing.assert_allclose(z_all, enc_all(views, rays)[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"source_mask \(2, 2\) must be \(B, K\)"):
    enc(views, rays, mask[:, :2])
