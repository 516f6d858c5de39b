"""Camera conventions against closed forms: look-at, projection, rays, Plucker, Fourier features."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax.data import cameras


def test_look_at_is_a_rotation_and_views_the_target_along_plus_z():
  eye, target = np.array([1.0, 2.0, 3.0]), np.array([0.2, -0.1, 0.4])
  w2c = cameras.look_at(eye, target)
  r = w2c[:3, :3]
  np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
  assert np.linalg.det(r) == pytest.approx(1.0)
  np.testing.assert_allclose(cameras.camera_centers(w2c), eye, atol=1e-12)
  # The target sits on the optical axis, in front: camera coordinates (0, 0, distance).
  cam = r @ target + w2c[:3, 3]
  np.testing.assert_allclose(cam, [0, 0, np.linalg.norm(target - eye)], atol=1e-12)
  # World up points to the top of the image: a point above the target has smaller v (y down).
  k = cameras.intrinsics_from_fov(40.0, 33, 33)
  (u, v), _ = cameras.project(target + [0, 0.1, 0], w2c, k)
  assert v < 16.5 and u == pytest.approx(16.5, abs=1e-9)
  np.testing.assert_allclose(cameras.invert_rigid(w2c), np.linalg.inv(w2c), atol=1e-12)


def test_principal_point_ray_hits_the_look_at_target_and_directions_are_unit():
  # Odd size: the centre pixel's centre is exactly the principal point (W / 2, H / 2).
  h = w = 33
  k = cameras.intrinsics_from_fov(30.0, h, w)
  w2c = cameras.ring_cameras(radius=2.5)
  o, d = cameras.pixel_rays(w2c, k, h, w)  # (48, 33, 33, 3)
  assert o.shape == d.shape == (48, h, w, 3) and o.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-6)
  centre_o, centre_d = o[:, h // 2, w // 2], d[:, h // 2, w // 2]
  to_target = -centre_o  # the target is the origin
  along = np.einsum("ni,ni->n", to_target, centre_d)
  np.testing.assert_allclose(along, 2.5, atol=1e-5)  # in front, at the ring's radius
  np.testing.assert_allclose(centre_o + along[:, None] * centre_d, 0.0, atol=1e-5)


def test_ring_cameras_sit_on_their_rings():
  w2c = cameras.ring_cameras(num_azimuths=24, elevations_deg=(15.0, 30.0), radius=2.0)
  assert w2c.shape == (48, 4, 4)
  c = cameras.camera_centers(w2c)
  np.testing.assert_allclose(np.linalg.norm(c, axis=-1), 2.0, atol=1e-12)
  np.testing.assert_allclose(np.degrees(np.arcsin(c[:, 1] / 2.0)), [15.0] * 24 + [30.0] * 24,
                             atol=1e-9)
  az = np.degrees(np.arctan2(c[:24, 0], c[:24, 2])) % 360
  np.testing.assert_allclose(az, np.arange(24) * 15.0, atol=1e-9)


def test_a_point_projects_to_the_pixel_whose_ray_passes_through_it():
  rng = np.random.default_rng(0)
  h, w = 24, 40
  k = np.array([[50.0, 0, 21.0], [0, 45.0, 11.5], [0, 0, 1]])  # non-square, off-centre
  w2c = cameras.look_at([0.5, 1.0, -3.0], [0.1, 0.0, 0.2])
  o, d = cameras.pixel_rays(w2c, k, h, w)
  for _ in range(5):
    i, j, depth = rng.integers(h), rng.integers(w), rng.uniform(1.0, 5.0)
    point = o[i, j].astype(np.float64) + depth * d[i, j]
    uv, z = cameras.project(point, w2c, k)
    np.testing.assert_allclose(uv, [j + 0.5, i + 0.5], atol=1e-4)  # pixel centre, (u, v)
    assert z > 0
  # And the closed form u = fx X / Z + cx, v = fy Y / Z + cy for a point given in camera frame.
  x_cam = np.array([0.3, -0.2, 2.0])
  world = cameras.invert_rigid(w2c) @ np.append(x_cam, 1.0)
  uv, z = cameras.project(world[:3], w2c, k)
  np.testing.assert_allclose(uv, [50 * 0.15 + 21.0, 45 * -0.1 + 11.5], atol=1e-9)
  assert z == pytest.approx(2.0)


def test_plucker_moment_is_orthogonal_origin_free_and_measures_distance():
  k = cameras.intrinsics_from_fov(50.0, 8, 8)
  w2c = cameras.look_at([2.0, 0.5, 1.0], [0.3, 0.2, -0.1])
  o, d = cameras.pixel_rays(w2c, k, 8, 8)
  p = cameras.plucker(o.astype(np.float64), d.astype(np.float64))  # (8, 8, 6)
  dirs, m = p[..., :3], p[..., 3:]
  np.testing.assert_allclose(np.einsum("...i,...i->...", m, dirs), 0.0, atol=1e-6)
  moved = cameras.plucker(o + 1.7 * d, d.astype(np.float64))  # another origin on the same ray
  np.testing.assert_allclose(moved[..., 3:], m, atol=1e-5)
  # |m| = distance from the world origin to the line: closest point o - (o . d) d.
  closest = o - np.einsum("...i,...i->...", o, d)[..., None] * d
  np.testing.assert_allclose(np.linalg.norm(m, axis=-1), np.linalg.norm(closest, axis=-1),
                             atol=1e-5)
  both = cameras.ray_map(w2c, k, 8, 8, kind="origin_direction")
  np.testing.assert_allclose(both, np.concatenate([o, d], -1))
  with pytest.raises(ValueError, match="ray kind"):
    cameras.ray_map(w2c, k, 8, 8, kind="euler")


def test_intrinsics_resize_and_ndc_conversion():
  k64 = cameras.intrinsics_from_fov(30.0, 64, 64)
  k32 = cameras.resize_intrinsics(k64, (64, 64), (32, 32))
  np.testing.assert_allclose(k32, cameras.intrinsics_from_fov(30.0, 32, 32), atol=1e-12)
  # Pixel centre (j + .5) at 32 px is the corner 2j + 1 at 64 px: same ray.
  j = 5
  np.testing.assert_allclose(np.linalg.inv(k32) @ [j + 0.5, j + 0.5, 1],
                             np.linalg.inv(k64) @ [2 * j + 1, 2 * j + 1, 1], atol=1e-12)
  # NMR's camera_mat: focal cot(15 deg) in [-1, 1] units, centred.
  f = 1 / math.tan(math.radians(15))
  cam = np.diag([f, f, 1.0, 1.0])
  k = cameras.ndc_to_pixel_intrinsics(cam, 64, 64)
  np.testing.assert_allclose(k, [[f * 32, 0, 32], [0, f * 32, 32], [0, 0, 1]], atol=1e-12)
  np.testing.assert_allclose(k, k64, atol=1e-9)  # = a 30 degree field of view
  k_ac = cameras.ndc_to_pixel_intrinsics(cam, 64, 64, align_corners=True)
  np.testing.assert_allclose(k_ac[[0, 0, 1], [0, 2, 2]], [f * 31.5, 32.0, 32.0], atol=1e-12)


def test_fourier_embed_numpy_and_jax_agree():
  x = np.array([[0.25, -1.0, 0.5]], np.float32)
  out = cameras.fourier_embed(x, num_freqs=3)
  assert out.shape == (1, cameras.fourier_channels(3, 3)) == (1, 21)
  np.testing.assert_allclose(out[0, :3], x[0])
  np.testing.assert_allclose(out[0, 3], math.sin(math.pi * 0.25), atol=1e-6)  # sin, f0, c0
  # cos block, frequency 1, channel 1
  np.testing.assert_allclose(out[0, 3 + 9 + 4], math.cos(2 * math.pi * -1.0), atol=1e-6)
  rays = cameras.ray_map(cameras.ring_cameras()[:2], cameras.intrinsics_from_fov(30, 4, 4), 4, 4)
  jitted = jax.jit(lambda r: cameras.fourier_embed(r, 4, include_input=False))(jnp.asarray(rays))
  assert isinstance(jitted, jax.Array) and jitted.shape == (2, 4, 4, 48)
  np.testing.assert_allclose(np.asarray(jitted), cameras.fourier_embed(rays, 4, False), atol=2e-5)
  jp = jax.jit(cameras.plucker)(jnp.ones((2, 3)), jnp.asarray([[0.0, 0.0, 1.0]] * 2))
  np.testing.assert_allclose(np.asarray(jp), [[0, 0, 1, 1, -1, 0]] * 2)
