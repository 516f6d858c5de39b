"""Latent arithmetic for looking at what z carries (colabs/explore.ipynb): interpolations,
per-sub-vector swaps and traversals. With layer modulation, sub-vector k of z drives only its
own group of decoder levels (soda.SODA.modulations), so swapping or moving one sub-vector shows
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


def traverse_subvectors(z: np.ndarray, scale: np.ndarray, model: soda.SODA,
                        steps=(-2.0, -1.0, 0.0, 1.0, 2.0)) -> np.ndarray:
  """(S, G, D): entry [s, k] is z with only sub-vector k moved by steps[s] * scale (per
  coordinate; e.g. the std of z over a batch of images), every other sub-vector untouched:
  decoding a row shows what group k's layers do as its sub-vector moves."""
  z, scale = np.asarray(z, np.float32), np.asarray(scale, np.float32)
  if z.shape != (model.latent_dim,) or scale.shape != z.shape:
    raise ValueError(f"z {z.shape} and scale {scale.shape} must both be ({model.latent_dim},)")
  out = np.repeat(np.repeat(z[None, None], len(steps), 0), len(model.subvector_slices), 1)
  for k, part in enumerate(model.subvector_slices):
    for s, step in enumerate(steps):
      out[s, k, part] += np.float32(step) * scale[part]
  return out
