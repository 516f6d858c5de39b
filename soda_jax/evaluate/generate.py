"""Reconstruction and novel-view generation with DDIM + guidance; sample grids as PNG."""
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from soda_jax import diffusion
from soda_jax.models import soda

IDENTITY_BOX = (0.0, 0.0, 1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("model", "schedule", "pred_type", "num_steps",
                                             "eta", "w_z", "w_p", "clip_x0"))
def _generate(model, variables, source, target_box, rng, *, schedule, pred_type, num_steps, eta,
              w_z, w_p, clip_x0):
  _, z = model.apply(variables, source, method=soda.SODA.encode)
  b = source.shape[0]

  def predict(x_t, t, use_latent, use_pose):
    keep = jnp.full((b, model.num_subvectors), use_latent)
    pose_keep = jnp.full((b,), use_pose)
    return model.apply(variables, x_t, t, z, keep, target_box, pose_keep,
                       method=soda.SODA.denoise)

  k_init, k_sample = jax.random.split(rng)
  x_T = jax.random.normal(k_init, source.shape, jnp.float32)
  return diffusion.ddim_sample(predict, x_T, rng=k_sample, num_steps=num_steps, eta=eta,
                               schedule=schedule, pred_type=pred_type, w_z=w_z, w_p=w_p,
                               clip_x0=clip_x0)


def generate(model: soda.SODA, variables: Any, source: jax.Array, rng: jax.Array,
             dcfg: ml_collections.ConfigDict, target_box: Optional[jax.Array] = None,
             num_steps: Optional[int] = None) -> jax.Array:
  """Encode `source` (B, H, W, C) and sample the view at `target_box` (default: the same view,
  i.e. reconstruction). Returns images in [-1, 1] (clipped)."""
  if target_box is None:
    target_box = jnp.tile(jnp.asarray([IDENTITY_BOX], jnp.float32), (source.shape[0], 1))
  out = _generate(model, variables, source, target_box, rng, schedule=dcfg.schedule,
                  pred_type=dcfg.pred_type, num_steps=int(num_steps or dcfg.sample_steps),
                  eta=float(dcfg.eta), w_z=float(dcfg.w_z), w_p=float(dcfg.w_p),
                  clip_x0=None if dcfg.get("clip_x0") is None else float(dcfg.clip_x0))
  return jnp.clip(out, -1.0, 1.0)


def to_uint8(x) -> np.ndarray:
  return np.asarray(np.clip((np.asarray(x, np.float32) + 1) * 127.5 + 0.5, 0, 255), np.uint8)


def image_grid(columns: Sequence[np.ndarray], pad: int = 1) -> np.ndarray:
  """columns: each (B, H, W, C) in [-1, 1] -> one uint8 image, a row per example.

  Used as (source | generated | real): one glance shows what the encoder saw, what the decoder
  made of it and what it should have made.
  """
  cols = [to_uint8(c) for c in columns]
  b, h, w, c = cols[0].shape
  grid = np.full((b * (h + pad) + pad, len(cols) * (w + pad) + pad, c), 255, np.uint8)
  for j, col in enumerate(cols):
    for i in range(b):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = col[i]
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return path
