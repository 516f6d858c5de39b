"""SODA: ResNet encoder -> bottleneck z -> per-level sub-vectors -> modulated UNet decoder."""
import itertools
from typing import Any, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from soda_jax.models import layers
from soda_jax.models.resnet import ResNet
from soda_jax.models.unet import UNet

MODULATIONS = ("layer", "global")
POSES = ("none", "box")
POSE_CHANNELS = {"none": 0, "box": 3}
LATENT_INITS = ("zero", "lecun")  # init of each block's latent_proj Dense
LATENT_ACTS = ("none", "silu")  # applied to z before the per-block projections


def split_sizes(latent_dim: int, num_parts: int) -> Tuple[int, ...]:
  """Sizes of the sub-vectors: as even as possible, the first `latent_dim % num_parts` get +1.

  E.g. 2048 over 6 groups -> (342, 342, 341, 341, 341, 341).
  """
  base, extra = divmod(latent_dim, num_parts)
  return tuple(base + (i < extra) for i in range(num_parts))


def num_subvectors(modulation: str, num_levels: int) -> int:
  """L + 1 groups (one per mirrored down/up level, one for the middle); 1 for global."""
  return num_levels + 1 if modulation == "layer" else 1


class SODA(nn.Module):
  """The full model. `encoder` and `decoder` are unbound modules (names: 'encoder', 'decoder').

  Masking: `keep` (B, num_subvectors) bool says which sub-vectors reach the decoder; a dropped
  whole latent is `keep` all False. In 'global' mode there is one group, the whole z, that drives
  every block. The target pose (a crop box for 2-D views) reaches the decoder as a per-pixel map.
  """
  encoder: nn.Module
  decoder: UNet
  latent_dim: int
  modulation: str = "layer"
  pose: str = "none"
  latent_act: str = "none"

  def setup(self):
    self.head = layers.dense(self.latent_dim)

  @property
  def num_subvectors(self) -> int:
    return num_subvectors(self.modulation, len(self.decoder.channel_mult))

  def encode(self, x, train: bool = False):
    """source view (B, H, W, C) -> (pooled features h (B, F), latent z (B, latent_dim))."""
    h = self.encoder(x, train=train)
    return h, self.head(h).astype(jnp.float32)

  def modulations(self, z, keep) -> List[Tuple[jax.Array, jax.Array]]:
    num_levels = len(self.decoder.channel_mult)
    if self.latent_act == "silu":
      z = nn.silu(z)
    if self.modulation == "global":
      return [(z, keep[:, 0])] * (num_levels + 1)
    subs = jnp.split(z, list(itertools.accumulate(split_sizes(self.latent_dim, num_levels + 1)))[:-1], axis=-1)
    return [(s, keep[:, i]) for i, s in enumerate(subs)]

  def denoise(self, x_t, t, z, keep, target_box=None, pose_keep=None, train: bool = False):
    """Predict (eps | v | x0) for x_t (B, H, W, C) at times t (B,) given z and its keep mask."""
    pose_map = None
    if self.pose == "box":
      if target_box is None:
        raise ValueError("model.pose='box' needs target_box (B, 4)")
      if pose_keep is None:
        pose_keep = jnp.ones(x_t.shape[:1], bool)
      pose_map = layers.box_to_pose_map(target_box, pose_keep, x_t.shape[1], x_t.shape[2])
    return self.decoder(x_t, t, self.modulations(z, keep), pose_map, train=train)

  def __call__(self, source, x_t, t, keep, target_box=None, pose_keep=None, train: bool = False):
    _, z = self.encode(source, train=train)
    return self.denoise(x_t, t, z, keep, target_box, pose_keep, train=train)


def build_model(model: ml_collections.ConfigDict, *, image_channels: int,
                dtype: Any = jnp.float32) -> SODA:
  """SODA from the `config.model` section (validated by config_checks beforehand)."""
  enc, dec = model.encoder, model.decoder
  encoder = ResNet(depth=enc.depth, version=enc.version, stem=enc.stem, width=enc.width,
                   num_groups=enc.get("num_groups", 32), dtype=dtype)
  decoder = UNet(
      out_channels=image_channels, base_channels=dec.base_channels,
      channel_mult=tuple(dec.channel_mult), num_res_blocks=dec.num_res_blocks,
      attention_resolutions=tuple(dec.attention_resolutions), num_heads=dec.num_heads,
      head_dim=dec.head_dim, dropout=dec.dropout, num_groups=dec.num_groups, dtype=dtype,
      remat=dec.get("remat", False), latent_init=model.latent_init)
  return SODA(encoder=encoder, decoder=decoder, latent_dim=model.latent_dim,
              modulation=model.modulation, pose=model.pose, latent_act=model.latent_act)


def init_inputs(batch_size: int, image_size: int, channels: int, num_groups: int):
  """Dummy inputs with the right shapes for `model.init` / `jax.eval_shape`."""
  x = jnp.zeros((batch_size, image_size, image_size, channels), jnp.float32)
  return dict(source=x, x_t=x, t=jnp.zeros((batch_size,)),
              keep=jnp.ones((batch_size, num_groups), bool),
              target_box=jnp.tile(jnp.array([[0., 0., 1., 1.]]), (batch_size, 1)),
              pose_keep=jnp.ones((batch_size,), bool))
