"""NMR and SRN readers on tiny fabricated folders (2 objects x 3 views) with known cameras."""
import math
import os

import numpy as np
from PIL import Image
import pytest

from soda_jax.data import cameras
from soda_jax.data import multiview as mv
from soda_jax.data import multiview_readers as readers

TARGET = np.array([0.1, -0.05, 0.0])


def fabricated_cameras(obj: int):
  """Three world-to-camera matrices per object, looking at TARGET from known eyes."""
  eyes = [[2.0 * math.sin(a), 0.8, 2.0 * math.cos(a)] for a in (0.3 + obj, 1.5 + obj, 4.0)]
  return np.array(eyes), np.stack([cameras.look_at(e, TARGET) for e in eyes])


def image(seed: int, size: int, alpha: bool = False) -> np.ndarray:
  """Random 2x2 blocks: a box-filter halving reproduces them exactly."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (size // 2, size // 2, 4 if alpha else 3), dtype=np.uint8)
  img = img.repeat(2, 0).repeat(2, 1)
  if alpha:
    img[..., 3] = 255
    img[:4, :4, 3] = 0  # a transparent corner: composited to white
  return img


def check_rays(w2c, k, eyes, size):
  """Centres match the fabricated eyes; the 4 central rays average to the look-at direction."""
  o, d = cameras.pixel_rays(w2c, k, size, size)
  np.testing.assert_allclose(o[:, 0, 0], eyes, atol=1e-5)
  mid = d[:, size // 2 - 1:size // 2 + 1, size // 2 - 1:size // 2 + 1].sum(axis=(1, 2))
  axis = (TARGET - eyes) / np.linalg.norm(TARGET - eyes, axis=-1, keepdims=True)
  np.testing.assert_allclose(mid / np.linalg.norm(mid, axis=-1, keepdims=True), axis, atol=1e-5)


@pytest.fixture
def nmr_root(tmp_path):
  f = 1 / math.tan(math.radians(15))  # NMR's 30 degree field of view in [-1, 1] units
  for obj, name in enumerate(("obj_a", "obj_b")):
    d = tmp_path / "02958343" / name
    (d / "image").mkdir(parents=True)
    _, w2c = fabricated_cameras(obj)
    cams = {}
    for v in range(3):
      Image.fromarray(image(10 * obj + v, 64, alpha=(v == 2))).save(d / "image" / f"{v:04d}.png")
      if obj == 0:
        cams[f"world_mat_{v}"] = w2c[v][:3]  # 3x4, as in DVR
      else:
        cams[f"world_mat_inv_{v}"] = np.linalg.inv(w2c[v])  # only the inverse (4x4)
      cams[f"camera_mat_{v}"] = np.diag([f, f, 1.0, 1.0])
    np.savez(d / "cameras.npz", **cams)
  (tmp_path / "02958343" / "softras_train.lst").write_text("obj_a\nobj_b\n")
  (tmp_path / "02958343" / "softras_test.lst").write_text("obj_b\n")
  (tmp_path / "no_lists_here").mkdir()
  return tmp_path


def test_nmr_reader_parses_the_fabricated_cameras_and_images(nmr_root):
  src = readers.NMRMultiView(str(nmr_root), "train", image_size=64)
  assert len(src) == 2 and src.categories == ["02958343"] * 2 and src.num_views(0) == 3
  assert len(readers.NMRMultiView(str(nmr_root), "test")) == 1
  f = 1 / math.tan(math.radians(15))
  for obj in (0, 1):
    eyes, w2c = fabricated_cameras(obj)
    got_w2c, got_k = src.cameras(obj)
    np.testing.assert_allclose(got_w2c, w2c, atol=1e-6)
    np.testing.assert_allclose(got_k, [[[32 * f, 0, 32], [0, 32 * f, 32], [0, 0, 1]]] * 3,
                               rtol=1e-6)
    check_rays(got_w2c, got_k, eyes, 64)
  imgs = src.images(0, [1, 2])
  assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(imgs[0], image(1, 64))
  np.testing.assert_array_equal(imgs[1, :4, :4], 255)  # alpha 0 -> white
  np.testing.assert_array_equal(imgs[1, 4:], image(2, 64, alpha=True)[4:, :, :3])
  # Resized: K scales with the image, rays stay those of the same cameras.
  half = readers.NMRMultiView(str(nmr_root), "train", image_size=32)
  _, k32 = half.cameras(0)
  np.testing.assert_allclose(k32[0], cameras.intrinsics_from_fov(30.0, 32, 32), rtol=1e-6)
  np.testing.assert_array_equal(half.images(0, [0])[0], image(0, 64)[::2, ::2])
  check_rays(*half.cameras(1), fabricated_cameras(1)[0], 32)
  ex = mv.sample_example(half, 1, np.random.default_rng(0), num_source_views=2)
  assert ex["source"].shape == (2, 32, 32, 3) and ex["target_rays"].shape == (32, 32, 6)


def test_nmr_reader_rejects_a_projection_as_world_mat_and_missing_splits(nmr_root, tmp_path):
  cam = nmr_root / "02958343" / "obj_a" / "cameras.npz"
  with np.load(cam) as c:
    bad = dict(c)
  bad["world_mat_1"] = cameras.intrinsics_from_fov(30, 64, 64) @ bad["world_mat_1"]  # K [R|t]
  np.savez(cam, **bad)
  with pytest.raises(ValueError, match="world_mat_1 is not a rotation"):
    readers.NMRMultiView(str(nmr_root), "train").cameras(0)
  with pytest.raises(FileNotFoundError, match="softras_val.lst"):
    readers.NMRMultiView(str(nmr_root), "val")


@pytest.fixture
def srn_root(tmp_path):
  root = tmp_path / "cars_train"
  for obj, name in enumerate(("1a2b", "3c4d")):
    d = root / name
    (d / "rgb").mkdir(parents=True)
    (d / "pose").mkdir()
    _, w2c = fabricated_cameras(obj)
    for v in range(3):
      Image.fromarray(image(20 * obj + v, 128)).save(d / "rgb" / f"{v:06d}.png")
      c2w = np.linalg.inv(w2c[v])
      if obj == 0:  # one line of 16 numbers
        text = " ".join(f"{x:.10f}" for x in c2w.ravel())
      else:  # four lines
        text = "\n".join(" ".join(f"{x:.10f}" for x in row) for row in c2w)
      (d / "pose" / f"{v:06d}.txt").write_text(text + "\n")
    (d / "intrinsics.txt").write_text("131.25 64. 64. 0.\n0. 0. 0.\n1.\n128 128\n")
  return root


def test_srn_reader_parses_the_fabricated_cameras_and_images(srn_root):
  src = readers.SRNMultiView(str(srn_root), image_size=128)
  assert len(src) == 2 and src.num_views(1) == 3
  for obj in (0, 1):
    eyes, w2c = fabricated_cameras(obj)
    got_w2c, got_k = src.cameras(obj)
    np.testing.assert_allclose(got_w2c, w2c, atol=1e-6)
    np.testing.assert_allclose(got_k, [[[131.25, 0, 64], [0, 131.25, 64], [0, 0, 1]]] * 3)
    check_rays(got_w2c, got_k, eyes, 128)
  np.testing.assert_array_equal(src.images(1, [2])[0], image(22, 128))
  small = readers.SRNMultiView(str(srn_root), image_size=64)
  w2c, k = small.cameras(0)
  np.testing.assert_allclose(k[0], [[65.625, 0, 32], [0, 65.625, 32], [0, 0, 1]])
  check_rays(w2c, k, fabricated_cameras(0)[0], 64)
  np.testing.assert_array_equal(small.images(0, [0])[0], image(0, 128)[::2, ::2])
