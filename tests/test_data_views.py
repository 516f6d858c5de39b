"""View sampling: decoding, crop-box geometry (exact against a linear gradient), flips, jitter."""
import io

import numpy as np
from PIL import Image
import pytest

from soda_jax import config_base
from soda_jax.data import views


def gradient(h=64, w=64):
  """uint8 (h, w, 1) with value 2*col + row: bilinear sampling reproduces it exactly."""
  yy, xx = np.mgrid[0:h, 0:w]
  return (2 * xx + yy).astype(np.uint8)[..., None]


def expected_gradient(box, out, h, w):
  """Value at every output pixel centre of a view `box`, and where PIL's filter is unclipped."""
  y0, x0, y1, x1 = box
  c = (np.arange(out) + 0.5) / out
  ys = (y0 + c * (y1 - y0)) * h  # continuous coordinates, pixel k spans [k, k+1)
  xs = (x0 + c * (x1 - x0)) * w
  value = 2 * (xs[None, :] - 0.5) + (ys[:, None] - 0.5)
  sy = max(1.0, abs(y1 - y0) * h / out)  # filter support grows when shrinking
  sx = max(1.0, abs(x1 - x0) * w / out)
  inside = ((ys[:, None] - sy >= 0.5) & (ys[:, None] + sy <= h - 0.5) &
            (xs[None, :] - sx >= 0.5) & (xs[None, :] + sx <= w - 0.5))
  return value, inside


def png_bytes(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


# --------------------------------------------------------------------------- decode


def test_decode_arrays_and_channels():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  assert views.decode({"image": grey}).shape == (3, 4, 1)
  rgb3 = views.decode({"image": grey}, channels=3)
  assert rgb3.shape == (3, 4, 3) and np.array_equal(rgb3[..., 2], grey)
  colour = np.zeros((2, 2, 3), np.uint8)
  colour[..., 0] = 200  # pure red -> luma round(0.299 * 200) = 60
  assert views.decode({"image": colour}, channels=1)[..., 0].tolist() == [[60, 60], [60, 60]]
  rgba = np.full((2, 2, 4), 7, np.uint8)
  assert views.decode(rgba).shape == (2, 2, 3)
  assert views.decode(np.full((2, 2), 300, np.int32)) is None  # not a uint8 image
  assert views.decode({"image": None}) is None


def test_decode_bytes_png_grey_colour_and_corrupt():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  assert np.array_equal(views.decode({"image": png_bytes(rgb)}), rgb)  # lossless
  grey = rgb[..., 0]
  assert np.array_equal(views.decode(png_bytes(grey), channels=3),
                        np.repeat(grey[..., None], 3, -1))
  good = png_bytes(rgb)
  assert views.decode(good[: len(good) // 2]) is None  # truncated
  assert views.decode(b"definitely not an image") is None
  assert views.decode(np.array(good, dtype=object)) is not None  # tfds bytes scalar


# --------------------------------------------------------------------------- geometry


# Enlarging (out=64 >= any crop of a 64x64 image) is exact bilinear interpolation. Shrinking
# (out=16) uses PIL's widened triangle filter: a weighted mean over several pixels whose centroid
# sits within ~0.05 px of the sample point, hence the looser tolerance (value slope <= 2 / px).
@pytest.mark.parametrize("out,atol", [(64, 2e-3), (16, 0.15)])
def test_crop_matches_box_on_gradient(out, atol):
  img = gradient()
  res = views.Resampler(img)
  rng = np.random.default_rng(0)
  checked = 0
  for _ in range(20):
    view, box = views.random_resized_crop(res, rng, out, scale=(0.2, 1.0), flip=True)
    assert view.dtype == np.float32 and view.shape == (out, out, 1)
    value, inside = expected_gradient(box, out, 64, 64)
    got = (view[..., 0] + 1) * 255 / 2  # back to pixel units
    np.testing.assert_allclose(got[inside], value[inside], atol=atol)
    checked += inside.sum()
  assert checked > 20 * out * out // 4


def test_explicit_box_and_flip():
  img = gradient()
  res = views.Resampler(img)
  box = (0.25, 0.125, 0.75, 0.625)  # rows 16..48, cols 8..40: a 32x32 window
  plain = res.crop(box, 32)
  # Output pixel (i, j) samples continuous (16 + i + 0.5, 8 + j + 0.5): exactly pixel (16+i, 8+j).
  np.testing.assert_allclose(plain[..., 0], img[16:48, 8:40, 0].astype(np.float32), atol=1e-3)
  flipped = res.crop((0.25, 0.625, 0.75, 0.125), 32)  # x0 > x1: mirrored
  np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_flip_probability_is_half():
  rng = np.random.default_rng(1)
  res = views.Resampler(gradient(8, 8))
  flips = [views.random_resized_crop(res, rng, 4, flip=True)[1] for _ in range(400)]
  frac = np.mean([b[1] > b[3] for b in flips])
  assert 0.4 < frac < 0.6
  no_flip = [views.random_resized_crop(res, rng, 4, flip=False)[1] for _ in range(50)]
  assert all(b[1] < b[3] for b in no_flip)


def test_sample_box_area_and_aspect():
  rng = np.random.default_rng(2)
  for _ in range(200):
    y0, x0, y1, x1 = views.sample_box(rng, 40, 60, scale=(0.3, 0.6), ratio=(0.75, 4 / 3))
    assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
    area = (y1 - y0) * (x1 - x0)
    aspect = (x1 - x0) * 60 / ((y1 - y0) * 40)
    assert 0.3 - 1e-9 <= area <= 0.6 + 1e-9 and 0.75 - 1e-9 <= aspect <= 4 / 3 + 1e-9
  # Impossible scale (> 1): falls back to the centred box of the ratio limit.
  assert views.sample_box(rng, 10, 40, scale=(2.0, 2.0), ratio=(1.0, 2.0)) == (0.0, 0.25, 1.0, 0.75)


def test_relative_box_numbers():
  frame = (0.2, 0.1, 0.6, 0.5)
  np.testing.assert_allclose(views.relative_box((0.3, 0.2, 0.5, 0.4), frame),
                             (0.25, 0.25, 0.75, 0.75))
  np.testing.assert_allclose(views.relative_box(frame, frame), (0, 0, 1, 1))
  flipped = (0.2, 0.5, 0.6, 0.1)  # the source view is mirrored
  np.testing.assert_allclose(views.relative_box((0.3, 0.2, 0.5, 0.4), flipped),
                             (0.25, 0.75, 0.75, 0.25))


def test_two_views_target_box_maps_target_into_source_frame():
  img = gradient()
  cfg = views.ViewConfig(image_size=24, crop_scale=(0.2, 0.8), flip=True)
  for seed in range(10):
    out = views.two_views(img, np.random.default_rng(seed), cfg)
    rng = np.random.default_rng(seed)  # replay the same draws to recover the absolute boxes
    src, sbox = views.random_resized_crop(img, rng, 24, cfg.crop_scale, cfg.crop_ratio, True)
    tgt, tbox = views.random_resized_crop(img, rng, 24, cfg.crop_scale, cfg.crop_ratio, True)
    np.testing.assert_array_equal(out["source"], src)
    np.testing.assert_array_equal(out["target"], tgt)
    assert out["target_box"].dtype == np.float32 and out["target_box"].shape == (4,)
    # Composing source-frame -> image with the relative box gives the target's image box.
    rel = out["target_box"].astype(np.float64)
    sy0, sx0, sy1, sx1 = sbox
    composed = (sy0 + rel[0] * (sy1 - sy0), sx0 + rel[1] * (sx1 - sx0),
                sy0 + rel[2] * (sy1 - sy0), sx0 + rel[3] * (sx1 - sx0))
    np.testing.assert_allclose(composed, tbox, atol=1e-6)


def test_same_view_is_identity():
  cfg = views.ViewConfig(image_size=16, same_view=True, color_jitter=0.5)
  out = views.two_views(gradient(), np.random.default_rng(0), cfg)
  np.testing.assert_array_equal(out["source"], out["target"])
  np.testing.assert_array_equal(out["target_box"], np.array([0, 0, 1, 1], np.float32))


def test_color_jitter_range_greyscale_and_off():
  rng = np.random.default_rng(3)
  x = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
  assert views.color_jitter(x, rng, 0.0) is x
  y = views.color_jitter(x, rng, 0.8)
  assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not np.allclose(x, y)
  g = views.color_jitter(x[..., :1], rng, 0.8)  # greyscale: no saturation step, no error
  assert g.shape == (8, 8, 1) and g.min() >= 0 and g.max() <= 1
  view, _ = views.random_resized_crop(gradient(), rng, 8, jitter=0.4)
  assert view.min() >= -1 and view.max() <= 1


def test_center_view():
  img = gradient(64, 64)
  v = views.center_view(img, 64)
  np.testing.assert_allclose((v[..., 0] + 1) * 255 / 2, img[..., 0], atol=2e-3)
  wide = np.zeros((32, 64, 1), np.uint8)
  wide[:, 12:52] = 255  # the centre square (cols 16..47) and the filter's reach are white
  assert views.center_box(32, 64) == (0.0, 0.25, 1.0, 0.75)
  np.testing.assert_allclose(views.center_view(wide, 16), 1.0, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_view_config_from_config(channels):
  d = config_base.data_config()
  d.channels = channels
  cfg = views.ViewConfig.from_config(d)
  assert cfg.image_size == d.image_size and cfg.crop_scale == tuple(d.crop_scale)
  out = views.two_views(np.zeros((20, 20, channels), np.uint8), np.random.default_rng(0), cfg)
  assert out["source"].shape == (d.image_size, d.image_size, channels)
