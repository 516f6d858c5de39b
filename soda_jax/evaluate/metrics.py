"""Image metrics in jnp, batched: PSNR and SSIM (Wang et al. 2004, Gaussian window)."""
import jax
import jax.numpy as jnp


def psnr(a: jax.Array, b: jax.Array, data_range: float) -> jax.Array:
  """(B, H, W, C) pairs -> (B,) dB; identical images give +inf."""
  mse = jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-x ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter(x, g):
  """Separable 'valid' filtering of (B, H, W, C) with the 1-D window g."""
  k = g.shape[0]
  c = x.shape[-1]
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, jnp.tile(g.reshape(k, 1, 1, 1), (1, 1, 1, c)), (1, 1),
                                   "VALID", dimension_numbers=dn, feature_group_count=c)
  return jax.lax.conv_general_dilated(x, jnp.tile(g.reshape(1, k, 1, 1), (1, 1, 1, c)), (1, 1),
                                      "VALID", dimension_numbers=dn, feature_group_count=c)


def ssim(a: jax.Array, b: jax.Array, data_range: float, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """(B, H, W, C) pairs -> (B,) mean SSIM over valid pixels and channels.

  Matches skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...)`. Images smaller than the window use a window
  clipped to the smaller side (odd), so 8x8 digits still get a (smaller-window) SSIM.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  size = min(win_size, a.shape[1], a.shape[2])
  size -= (size + 1) % 2
  g = _gaussian_window(size, sigma)
  mu_a, mu_b = _filter(a, g), _filter(b, g)
  var_a = _filter(a * a, g) - mu_a ** 2
  var_b = _filter(b * b, g) - mu_b ** 2
  cov = _filter(a * b, g) - mu_a * mu_b
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))
