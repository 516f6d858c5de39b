"""Reconstruction and novel-view generation with DDIM + guidance; sample grids as PNG."""
import functools
import os
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from soda_jax import diffusion, multihost, sharding
from soda_jax.models import soda

IDENTITY_BOX = (0.0, 0.0, 1.0, 1.0)


# The static arguments of a DDIM step program (here and in nvs.py): the model and the sampler's
# settings (`_sampler_kwargs`).
STEP_STATIC = ("model", "schedule", "pred_type", "num_steps", "eta", "w_z", "w_p", "clip_x0")


@functools.partial(multihost.compile_then_meet, name="sampler_noise")
@functools.partial(jax.jit, static_argnames=("shape", "layout"))
def _noise(rng, *, shape, layout):
  k_init, k_steps = jax.random.split(rng)
  x_T = jax.random.normal(k_init, shape, jnp.float32)
  return (x_T if layout is None else jax.lax.with_sharding_constraint(x_T, layout)), k_steps


def initial_noise(rng: jax.Array, shape: Sequence[int],
                  like: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(x_T of `shape`, the key of the DDIM steps) from rng. When the batch `like` is laid out over
  a mesh, x_T's first axis is split as like's is (its other axes whole), so the step program
  takes and returns one layout and compiles once."""
  layout = getattr(like, "sharding", None)
  if isinstance(layout, jax.sharding.NamedSharding):
    batch_axes = layout.spec[0] if len(layout.spec) else None
    layout = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec(batch_axes))
  else:
    layout = None
  return _noise(rng, shape=tuple(int(d) for d in shape), layout=layout)


@functools.partial(multihost.compile_then_meet, name="encode_for_sampling")
@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model, variables, source):
  return model.apply(variables, source, method=soda.SODA.encode)[1]


@functools.partial(multihost.compile_then_meet, name="ddim_step")
@functools.partial(jax.jit, static_argnames=STEP_STATIC)
def _step(model, variables, z, target_box, x, k, rng, *, schedule, pred_type, num_steps, eta,
          w_z, w_p, clip_x0):
  b = z.shape[0]

  def predict(x_t, t, use_latent, use_pose):
    keep = jnp.full((b, model.num_subvectors), use_latent)
    pose_keep = jnp.full((b,), use_pose)
    return model.apply(variables, x_t, t, z, keep, target_box, pose_keep,
                       method=soda.SODA.denoise)

  return diffusion.ddim_update(predict, x, k, rng=rng, num_steps=num_steps, eta=eta,
                               schedule=schedule, pred_type=pred_type, w_z=w_z, w_p=w_p,
                               clip_x0=clip_x0)


def _ddim_from_z(model, variables, z, target_box, rng, image_shape, **kwargs) -> jax.Array:
  x_T, k_steps = initial_noise(rng, (z.shape[0],) + tuple(image_shape), z)
  step = functools.partial(_step, model, variables, z, target_box, rng=k_steps, **kwargs)
  return diffusion.ddim_sample(step, x_T, kwargs["num_steps"])


def _mesh_of(variables: Any) -> Optional[jax.sharding.Mesh]:
  """The mesh the variables are laid out on, if any."""
  for leaf in jax.tree.leaves(variables):
    if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
      return leaf.sharding.mesh
  return None


def _sampler_kwargs(dcfg: ml_collections.ConfigDict, num_steps: Optional[int]) -> dict:
  return dict(schedule=dcfg.schedule, pred_type=dcfg.pred_type,
              num_steps=int(num_steps or dcfg.sample_steps), eta=float(dcfg.eta),
              w_z=float(dcfg.w_z), w_p=float(dcfg.w_p),
              clip_x0=None if dcfg.get("clip_x0") is None else float(dcfg.clip_x0))


def _identity_boxes(b: int) -> jax.Array:
  return jnp.tile(jnp.asarray([IDENTITY_BOX], jnp.float32), (b, 1))


def generate(model: soda.SODA, variables: Any, source: jax.Array, rng: jax.Array,
             dcfg: ml_collections.ConfigDict, target_box: Optional[jax.Array] = None,
             num_steps: Optional[int] = None) -> jax.Array:
  """Encode `source` (B, H, W, C) and sample the view at `target_box` (default: the same view,
  i.e. reconstruction). Returns images in [-1, 1] (clipped)."""
  if target_box is None:
    target_box = _identity_boxes(source.shape[0])
  z = _encode(model, variables, source)
  out = _ddim_from_z(model, variables, z, target_box, rng, source.shape[1:],
                     **_sampler_kwargs(dcfg, num_steps))
  return jnp.clip(out, -1.0, 1.0)


def decode(model: soda.SODA, variables: Any, z: jax.Array, rng: jax.Array,
           dcfg: ml_collections.ConfigDict, image_shape: Sequence[int],
           target_box: Optional[jax.Array] = None,
           num_steps: Optional[int] = None) -> jax.Array:
  """Sample images (B, *image_shape) from given latents z (B, latent_dim): for latents that no
  image produced (interpolations, sub-vector swaps, traversals). Same sampler as `generate`."""
  z = jnp.asarray(z, jnp.float32)
  if z.ndim != 2 or z.shape[1] != model.latent_dim:
    raise ValueError(f"z has shape {z.shape}; expected (B, {model.latent_dim})")
  if target_box is None:
    target_box = _identity_boxes(z.shape[0])
  mesh = _mesh_of(variables)
  if mesh is not None and not isinstance(z.sharding, jax.sharding.NamedSharding):
    # A host z beside variables on a mesh: replicated there, so that x_T is too and the step's
    # input and output layouts agree (otherwise the first step compiles a program of its own).
    z = sharding.from_host(np.asarray(z), sharding.replicated(mesh))
  out = _ddim_from_z(model, variables, z, target_box, rng, image_shape,
                     **_sampler_kwargs(dcfg, num_steps))
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
