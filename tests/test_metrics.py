"""PSNR and SSIM against closed forms and, where installed, scikit-image."""
import numpy as np
import pytest

from soda_jax.evaluate import metrics


def _images(shape, seed, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def test_psnr_identical_images_is_inf():
  a = _images((2, 8, 8, 3), 0)
  assert np.all(np.isposinf(np.asarray(metrics.psnr(a, a, data_range=1.0))))


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
def test_psnr_constant_offset_is_closed_form(data_range):
  a = _images((3, 16, 16, 3), 1, high=data_range)
  d = np.array([0.01, 0.1, 0.25], np.float32) * data_range
  b = a + d[:, None, None, None]
  expected = 10 * np.log10(data_range ** 2 / d.astype(np.float64) ** 2)
  np.testing.assert_allclose(metrics.psnr(a, b, data_range), expected, rtol=0, atol=1e-4)


def test_psnr_gaussian_noise_is_close_to_analytic():
  sigma = 0.05
  a = _images((2, 128, 128, 3), 2, low=-1.0, high=1.0)
  b = a + sigma * np.random.default_rng(3).standard_normal(a.shape).astype(np.float32)
  # 10 log10(R^2 / sigma^2) = 32.04 dB; MSE over 49k pixels is within ~1% (0.03 dB) of sigma^2.
  np.testing.assert_allclose(metrics.psnr(a, b, 2.0), 10 * np.log10(4 / sigma ** 2), atol=0.15)


def test_ssim_identical_images_is_one():
  a = _images((2, 24, 20, 3), 4, low=-1.0, high=1.0)
  np.testing.assert_allclose(metrics.ssim(a, a, data_range=2.0), 1.0, atol=1e-6)


def test_ssim_is_symmetric_and_below_one_for_different_images():
  a = _images((3, 32, 32, 3), 5)
  b = np.clip(a + 0.1 * np.random.default_rng(6).standard_normal(a.shape), 0, 1)
  ab = np.asarray(metrics.ssim(a, b, 1.0))
  np.testing.assert_allclose(ab, np.asarray(metrics.ssim(b, a, 1.0)), atol=1e-6)
  assert np.all(ab < 0.99) and np.all(ab > 0.0)
  # Unrelated images score near 0, well below the noisy copy.
  assert np.all(np.asarray(metrics.ssim(a, _images(a.shape, 7), 1.0)) < 0.1)


@pytest.mark.parametrize("shape,data_range,low", [
    ((3, 32, 32, 3), 1.0, 0.0),    # [0, 1] colour
    ((2, 28, 28, 1), 2.0, -1.0),   # [-1, 1] grey, one channel
    ((2, 17, 40), 2.0, -1.0),      # (B, H, W), non-square
])
def test_ssim_matches_skimage(shape, data_range, low):
  skm = pytest.importorskip("skimage.metrics")
  a = _images(shape, 8, low=low, high=low + data_range)
  noise = np.random.default_rng(9).standard_normal(shape)
  b = np.clip(a + 0.2 * data_range * noise, low, low + data_range).astype(np.float32)
  ours = np.asarray(metrics.ssim(a, b, data_range))
  channel_axis = -1 if len(shape) == 4 else None
  ref = [skm.structural_similarity(a[i].astype(np.float64), b[i].astype(np.float64),
                                   data_range=data_range, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, channel_axis=channel_axis)
         for i in range(shape[0])]
  # Measured |diff| ~6e-8; sample covariance (NP/(NP-1)) would be off by up to ~2e-5.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_ssim_on_images_smaller_than_the_window_clips_it():
  a = _images((2, 8, 9, 1), 10)
  b = np.clip(a + 0.1 * np.random.default_rng(11).standard_normal(a.shape), 0, 1)
  s = np.asarray(metrics.ssim(a, b, 1.0))  # rows clip to 7 taps, columns to 9
  assert s.shape == (2,) and np.all(np.isfinite(s)) and np.all(s < 1.0)
  np.testing.assert_allclose(metrics.ssim(a, a, 1.0), 1.0, atol=1e-6)
  # 8 x 8: both axes clip to 7 taps, which is exactly win_size=7.
  a8, b8 = a[:, :, :8], b[:, :, :8]
  np.testing.assert_allclose(metrics.ssim(a8, b8, 1.0), metrics.ssim(a8, b8, 1.0, win_size=7),
                             atol=1e-7)


def test_metrics_reject_bad_shapes_and_range():
  a = _images((2, 8, 8, 3), 12)
  with pytest.raises(ValueError, match=r"same shape, got \(2, 8, 8, 3\) and \(2, 8, 8, 1\)"):
    metrics.psnr(a, a[..., :1], 1.0)
  with pytest.raises(ValueError, match=r"\(B, H, W, C\) or \(B, H, W\), got shape \(8, 8\)"):
    metrics.ssim(a[0, ..., 0], a[0, ..., 0], 1.0)
  with pytest.raises(ValueError, match=r"data_range must be > 0, got 0"):
    metrics.ssim(a, a, 0)
  with pytest.raises(ValueError, match=r"win_size must be a positive odd integer, got 10"):
    metrics.ssim(a, a, 1.0, win_size=10)
