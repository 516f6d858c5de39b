"""Per-image reconstruction metrics in jnp: PSNR and SSIM, batched, jit-friendly.

Images are (B, H, W, C) or (B, H, W), in any range: `data_range` (max - min of the valid range,
e.g. 2.0 for [-1, 1], 1.0 for [0, 1]) is explicit, so a wrong guess cannot shift the numbers.
Both return one value per image, (B,), computed in float32.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _check(a, b, data_range) -> Tuple[jax.Array, jax.Array]:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
  if a.ndim not in (3, 4):
    raise ValueError(f"images must be (B, H, W, C) or (B, H, W), got shape {a.shape}")
  if isinstance(data_range, (int, float)) and not data_range > 0:
    raise ValueError(f"data_range must be > 0, got {data_range}")
  return (a, b) if a.ndim == 4 else (a[..., None], b[..., None])


def psnr(a, b, data_range: float) -> jax.Array:
  """10 log10(data_range^2 / MSE) per image, MSE over pixels and channels; +inf where a == b."""
  a, b = _check(a, b, data_range)
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  return 10.0 * jnp.log10(jnp.square(jnp.float32(data_range)) / mse)


def _gaussian_taps(size: int, win_size: int, sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian window, cut to the largest odd length that fits `size` pixels."""
  n = min(win_size, size if size % 2 else size - 1)
  r = np.arange(n, dtype=np.float64) - (n - 1) / 2
  taps = np.exp(-0.5 * (r / sigma) ** 2)
  return (taps / taps.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, taps_h: np.ndarray, taps_w: np.ndarray) -> jax.Array:
  """Separable 'valid' filtering of (B, H, W, C) as a weighted sum of shifted slices.

  Exact, no conv op: the windows are tiny, and XLA fuses the slices into one loop.
  """
  h = x.shape[1] - len(taps_h) + 1
  x = sum(float(t) * x[:, i:i + h] for i, t in enumerate(taps_h))
  w = x.shape[2] - len(taps_w) + 1
  return sum(float(t) * x[:, :, j:j + w] for j, t in enumerate(taps_w))


@functools.partial(jax.jit, static_argnames=("win_size", "sigma"))
def _ssim(a, b, data_range, k1, k2, *, win_size: int, sigma: float):
  c = a.shape[-1]
  taps_h = _gaussian_taps(a.shape[1], win_size, sigma)
  taps_w = _gaussian_taps(a.shape[2], win_size, sigma)
  # One filtering pass over the five moment maps, stacked on the channel axis.
  moments = _filter_valid(jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1), taps_h, taps_w)
  mu_a, mu_b, e_aa, e_bb, e_ab = (moments[..., i * c:(i + 1) * c] for i in range(5))
  var_a = e_aa - mu_a * mu_a
  var_b = e_bb - mu_b * mu_b
  cov = e_ab - mu_a * mu_b
  c1 = jnp.square(k1 * data_range)
  c2 = jnp.square(k2 * data_range)
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
       / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)))
  return jnp.mean(s, axis=(1, 2, 3))


def ssim(a, b, data_range: float, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
  """Mean SSIM per image (Wang et al. 2004) with a Gaussian window, averaged over channels.

  Matches skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=..., channel_axis=-1)`: local statistics from a
  normalised `win_size`-tap Gaussian (population covariance), averaged over the positions where
  the window lies fully inside the image ('valid'). Unlike skimage, which raises, an image
  smaller than the window along an axis gets the window cut to the largest odd length that
  fits there (renormalised), so tiny test images still get a score.
  """
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  a, b = _check(a, b, data_range)
  return _ssim(a, b, jnp.float32(data_range), jnp.float32(k1), jnp.float32(k2),
               win_size=int(win_size), sigma=float(sigma))
