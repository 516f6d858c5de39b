"""Random perturbations of param trees for tests, drawn with NumPy.

Eager `jax.random.normal` compiles one threefry program per distinct leaf shape, about a second
each on XLA:CPU: ~39 s of compiling for the tiny model's ~40 shapes, more than the test around
it (docs/benchmarks.md, session 7). NumPy draws the same kind of noise with nothing to compile.
"""
import jax
import numpy as np


def perturbed(params, seed: int = 1, scale: float = 0.2):
  """params + scale * N(0, 1) noise on every leaf (float32 NumPy leaves, same tree).

  Zero-initialised output convs and latent projections otherwise hide whether an input reaches
  the output.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: (np.asarray(p) + scale * rng.standard_normal(np.shape(p))).astype(np.float32),
      params)
