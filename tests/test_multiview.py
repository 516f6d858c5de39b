"""Synthetic multi-view objects: geometry against closed forms, determinism, caching, examples."""
import math
import pickle

import grain
import numpy as np
import pytest

from soda_jax.data import cameras
from soda_jax.data import multiview as mv
from soda_jax.data import views


def test_unit_sphere_silhouette_is_where_the_cameras_say():
  # Centred: the silhouette of a sphere (radius r, distance D) is a circle around the principal
  # point of radius f r / sqrt(D^2 - r^2) pixels.
  size, dist = 64, 6.0
  k = cameras.intrinsics_from_fov(30.0, size, size)
  w2c = cameras.ring_cameras(num_azimuths=3, elevations_deg=(10.0, 50.0), radius=dist)
  _, alpha = mv.render(mv.sphere_scene(1.0), w2c, k, size, size, supersample=4)
  centre = (np.arange(size) + 0.5)  # pixel centres
  for a in alpha:
    area = a.sum()
    v, u = (a.sum(1) * centre).sum() / area, (a.sum(0) * centre).sum() / area
    assert (u, v) == pytest.approx((size / 2, size / 2), abs=0.02)
    expected = k[0, 0] / math.sqrt(dist ** 2 - 1.0)  # 20.18 px
    assert math.sqrt(area / math.pi) == pytest.approx(expected, abs=0.05)


def test_off_centre_sphere_covers_exactly_the_pixels_whose_rays_pass_within_r():
  # |o x d| is the distance of a pixel's ray from the sphere's centre (the origin): the pixel is
  # covered iff it is below r. Independent of the renderer's quadratic.
  k = cameras.intrinsics_from_fov(40.0, 32, 32)
  w2c = cameras.look_at([0.5, 1.0, 4.0], [1.2, 0.4, 0.0])[None]
  rgb, alpha = mv.render(mv.sphere_scene(0.8), w2c, k, 32, 32, supersample=1)
  dist = np.linalg.norm(cameras.ray_map(w2c, k, 32, 32)[0, ..., 3:], axis=-1)
  clear = np.abs(dist - 0.8) > 1e-4
  np.testing.assert_array_equal(alpha[0][clear], (dist < 0.8)[clear].astype(np.float32))
  assert 50 < alpha.sum() < 32 * 32 - 50  # partly in frame, off-centre
  # Background is exactly BACKGROUND; lit pixels are albedo * shade, shade in [AMBIENT, 1].
  np.testing.assert_array_equal(rgb[0][alpha[0] == 0], np.float32(1.0))
  lit = rgb[0][alpha[0] == 1] / np.float32([0.8, 0.2, 0.2])
  assert lit.min() >= mv.AMBIENT - 1e-6 and lit.max() <= 1 + 1e-6


def test_objects_are_deterministic_distinct_and_split_by_id():
  a = mv.SyntheticMultiView("train", num_objects=3, image_size=32)
  b = mv.SyntheticMultiView("train", num_objects=3, image_size=32)
  ids = [0, 17, 40]
  img = a.images(1, ids)
  assert img.shape == (3, 32, 32, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img, b.images(1, ids))  # fresh source, same bits
  assert not np.array_equal(img, a.images(2, ids))
  assert (img == 255).all(-1).mean() > 0.3  # a white background around the object
  test = mv.SyntheticMultiView("test", num_objects=3, image_size=32)
  assert not set(test.object_ids) & set(a.object_ids)
  assert not np.array_equal(test.images(1, ids), img)
  w2c, k = a.cameras(0)
  assert w2c.shape == (48, 4, 4) and k.shape == (48, 3, 3) and a.num_views(0) == 48


def test_each_view_renders_once_and_pickles_without_its_cache(monkeypatch):
  rendered = []
  real_render = mv.render

  def counting(scene, w2c, *args, **kw):
    rendered.append(len(w2c))
    return real_render(scene, w2c, *args, **kw)

  monkeypatch.setattr(mv, "render", counting)
  src = mv.SyntheticMultiView(num_objects=2, image_size=16, max_cached_views=3)
  first = src.images(0, [1, 2])
  np.testing.assert_array_equal(src.images(0, [2, 1]), first[::-1])
  src.images(0, [2, 3])
  assert rendered == [2, 1]  # views 1 and 2 in one call, then only view 3
  src.images(1, [0])  # evicts the least recently used (object 0, view 1)
  src.images(0, [1])
  assert rendered == [2, 1, 1, 1]
  clone = pickle.loads(pickle.dumps(src))
  assert len(clone._cache) == 0
  np.testing.assert_array_equal(clone.images(0, [1, 2]), first)


def test_example_shapes_ranges_rays_and_determinism():
  src = mv.SyntheticMultiView(num_objects=4, image_size=16, supersample=1)
  ex = mv.sample_example(src, 2, np.random.default_rng(7), num_source_views=3)
  assert ex["source"].shape == (3, 16, 16, 3) and ex["source_rays"].shape == (3, 16, 16, 6)
  assert ex["target"].shape == (16, 16, 3) and ex["target_rays"].shape == (16, 16, 6)
  for key in ("source", "source_rays", "target", "target_rays"):
    assert ex[key].dtype == np.float32
  assert ex["source"].min() >= -1 and ex["source"].max() == 1.0  # white background = +1
  assert int(ex["target_view"]) not in ex["source_views"].tolist()
  assert len(set(ex["source_views"].tolist())) == 3 and int(ex["index"]) == 2
  w2c, k = src.cameras(2)
  tv = int(ex["target_view"])
  np.testing.assert_array_equal(ex["target_rays"], cameras.ray_map(w2c[tv], k[tv], 16, 16))
  np.testing.assert_array_equal(ex["target"], views.to_unit_range(src.images(2, [tv])[0]))
  again = mv.sample_example(src, 2, np.random.default_rng(7), num_source_views=3)
  for key in ex:
    np.testing.assert_array_equal(ex[key], again[key])
  other = mv.sample_example(src, 2, np.random.default_rng(8), num_source_views=3)
  assert not np.array_equal(other["source_views"], ex["source_views"])
  with pytest.raises(ValueError, match="num_source_views=48"):
    mv.sample_example(src, 0, np.random.default_rng(0), num_source_views=48)
  np.testing.assert_array_equal(ex["source_mask"], [True, True, True])  # K fixed: all count


def test_min_source_views_draws_k_and_masks_a_prefix():
  """k ~ U{min..K}: every k occurs, the first k views count; the views themselves are the
  fixed-K draw's (the same rng stream up to k), so K fixed keeps old streams unchanged."""
  src = mv.SyntheticMultiView(num_objects=2, image_size=8, supersample=1)
  ks = []
  for seed in range(60):
    fixed = mv.sample_example(src, 1, np.random.default_rng(seed), num_source_views=3)
    ex = mv.sample_example(src, 1, np.random.default_rng(seed), num_source_views=3,
                           min_source_views=1)
    k = int(ex["source_mask"].sum())
    np.testing.assert_array_equal(ex["source_mask"], np.arange(3) < k)
    for key in ("source", "source_views", "target_view"):
      np.testing.assert_array_equal(ex[key], fixed[key])
    ks.append(k)
  assert set(ks) == {1, 2, 3}, ks
  two = [int(mv.sample_example(src, 0, np.random.default_rng(s), 3, min_source_views=2)
             ["source_mask"].sum()) for s in range(30)]
  assert set(two) == {2, 3}, two
  for bad in (0, 4):
    with pytest.raises(ValueError, match=f"min_source_views={bad} needs 1 <= it <= "
                                         "num_source_views=3"):
      mv.sample_example(src, 0, np.random.default_rng(0), 3, min_source_views=bad)


def test_grain_stream_of_examples_is_reproducible():
  src = mv.SyntheticMultiView(num_objects=4, image_size=8, supersample=1)

  def stream():
    ds = grain.MapDataset.range(len(src)).seed(3).shuffle().random_map(
        mv.NovelViewTransform(src, num_source_views=2, ray_kind="origin_direction"))
    return [ds[i] for i in range(4)]

  a, b = stream(), stream()
  assert sorted(int(x["index"]) for x in a) == [0, 1, 2, 3]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["target"], y["target"])
    np.testing.assert_array_equal(x["source_rays"], y["source_rays"])
  np.testing.assert_allclose(np.linalg.norm(a[0]["target_rays"][..., 3:], axis=-1), 1, atol=1e-6)
