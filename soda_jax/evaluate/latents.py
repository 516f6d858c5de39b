"""Latent arithmetic for looking at what z carries (colabs/explore.ipynb): interpolations and
per-sub-vector swaps. With layer modulation, sub-vector k of z drives only its own group of
decoder levels (soda.SODA.modulations), so swapping one sub-vector between two images shows
what that group of layers controls. Decode the results with `generate.decode`."""
import itertools
from typing import List

import numpy as np

from soda_jax.models import soda


def subvector_slices(model: soda.SODA) -> List[slice]:
  """The coordinates of z that each group of decoder levels reads, in the model's order
  (outermost level first, the middle block last); one slice (all of z) for global modulation."""
  if model.modulation == "global":
    return [slice(0, model.latent_dim)]
  sizes = soda.split_sizes(model.latent_dim, model.num_subvectors)
  ends = list(itertools.accumulate(sizes))
  return [slice(end - size, end) for size, end in zip(sizes, ends)]


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
  for part in subvector_slices(model):
    z = z_a.copy()
    z[part] = z_b[part]
    rows.append(z)
  return np.stack(rows)
