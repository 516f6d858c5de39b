"""Latent arithmetic for looking at what z carries (colabs/explore.ipynb): interpolations and
per-sub-vector swaps. With layer modulation, sub-vector k of z drives only its own group of
decoder levels (soda.SODA.modulations), so swapping one sub-vector between two images shows
what that group of layers controls (`SODA.subvector_slices`). Decode the results with
`generate.decode`."""
import numpy as np

from soda_jax.models import soda


def interpolate(z_a: np.ndarray, z_b: np.ndarray, num: int) -> np.ndarray:
  """(num, D): z_a, ..., z_b in equal linear steps (num >= 2)."""
  if num < 2:
    raise ValueError(f"num={num}: an interpolation needs at least its two ends")
  alpha = np.linspace(0.0, 1.0, num, dtype=np.float32)[:, None]
  return (1.0 - alpha) * np.asarray(z_a, np.float32) + alpha * np.asarray(z_b, np.float32)


def swap_subvectors(z_a: np.ndarray, z_b: np.ndarray, model: soda.SODA) -> np.ndarray:
  """(G, D): row k is z_a with sub-vector k taken from z_b (G = number of sub-vectors)."""
  z_a, z_b = np.asarray(z_a, np.float32), np.asarray(z_b, np.float32)
  rows = []
  for part in model.subvector_slices:
    z = z_a.copy()
    z[part] = z_b[part]
    rows.append(z)
  return np.stack(rows)
