"""SODA: ResNet encoder -> bottleneck z -> per-level sub-vectors -> modulated UNet decoder."""
import itertools
from typing import Any, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from soda_jax.data import cameras
from soda_jax.models import layers
from soda_jax.models.resnet import ResNet
from soda_jax.models.unet import UNet

MODULATIONS = ("layer", "global")
POSES = ("none", "box", "rays")
POSE_CHANNELS = {"none": 0, "box": 3}
DEFAULT_RAY_FREQS = 4  # pose='rays': Fourier frequencies of the Plucker ray maps
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
  ray_freqs: int = DEFAULT_RAY_FREQS  # pose='rays': see layers.embed_rays
  pose: str = "none"
  latent_act: str = "none"

  def setup(self):
    self.head = layers.dense(self.latent_dim)

  @property
  def num_subvectors(self) -> int:
    return num_subvectors(self.modulation, len(self.decoder.channel_mult))

  @property
  def subvector_slices(self) -> List[slice]:
    """The coordinates of z that each group of decoder levels reads, outermost level first, the
    middle block last; one slice (all of z) for global modulation."""
    ends = list(itertools.accumulate(split_sizes(self.latent_dim, self.num_subvectors)))
    return [slice(start, end) for start, end in zip([0] + ends[:-1], ends)]

  def encode(self, x, train: bool = False, source_rays=None, source_mask=None):
    """source view (B, H, W, C) -> (pooled features h (B, F), latent z (B, latent_dim)).

    K source views (B, K, H, W, C) run through the encoder as B * K images; h and z are the
    means over the K views (one latent per object, independent of the views' order), or over
    the views `source_mask` (B, K) bool marks (each row needs one). With pose='rays' each
    view's ray map `source_rays` (..., H, W, 6) is Fourier-embedded and concatenated to its
    pixels. (A masked view still passes through the encoder, so in training its pixels enter
    BatchNorm's batch statistics: a real view of the same object, not padding.)
    """
    if self.pose == "rays":
      if source_rays is None:
        raise ValueError("model.pose='rays' needs source_rays (..., H, W, 6)")
      x = jnp.concatenate([x, layers.embed_rays(source_rays, self.ray_freqs).astype(x.dtype)],
                          axis=-1)
    lead = x.shape[:-3]
    if source_mask is not None and (len(lead) != 2 or tuple(source_mask.shape) != lead):
      raise ValueError(f"source_mask {tuple(source_mask.shape)} must be (B, K) = {lead} of the "
                       "K source views (B, K, H, W, C)")
    h = self.encoder(x.reshape((-1,) + x.shape[-3:]), train=train)
    z = self.head(h).astype(jnp.float32)
    if len(lead) == 2:
      h, z = (a.reshape(lead + a.shape[1:]) for a in (h, z))
      if source_mask is None:
        h, z = h.mean(axis=1), z.mean(axis=1)
      else:
        k = jnp.sum(source_mask, axis=1, keepdims=True)  # (B, 1): views counted
        # where, not a 0 weight: nothing of a masked view reaches z, not even a NaN.
        h, z = (jnp.sum(jnp.where(source_mask[:, :, None], a, 0), axis=1) / k.astype(a.dtype)
                for a in (h, z))
    return h, z

  def modulations(self, z, keep) -> List[Tuple[jax.Array, jax.Array]]:
    num_levels = len(self.decoder.channel_mult)
    if self.latent_act == "silu":
      z = nn.silu(z)
    if self.modulation == "global":
      return [(z, keep[:, 0])] * (num_levels + 1)
    return [(z[..., part], keep[:, i]) for i, part in enumerate(self.subvector_slices)]

  def denoise(self, x_t, t, z, keep, target_box=None, pose_keep=None, train: bool = False,
              target_rays=None):
    """Predict (eps | v | x0) for x_t (B, H, W, C) at times t (B,) given z and its keep mask.

    The pose: pose='box' needs target_box (B, 4), pose='rays' target_rays (B, H, W, 6);
    pose_keep (B,) False drops it (default: kept)."""
    pose_map = None
    if self.pose == "box":
      if target_box is None:
        raise ValueError("model.pose='box' needs target_box (B, 4)")
      if pose_keep is None:
        pose_keep = jnp.ones(x_t.shape[:1], bool)
      pose_map = layers.box_to_pose_map(target_box, pose_keep, x_t.shape[1], x_t.shape[2])
    if self.pose == "rays":
      if target_rays is None:
        raise ValueError("model.pose='rays' needs target_rays (B, H, W, 6)")
      if pose_keep is None:
        pose_keep = jnp.ones(x_t.shape[:1], bool)
      pose_map = layers.rays_to_pose_map(target_rays, pose_keep, self.ray_freqs)
    return self.decoder(x_t, t, self.modulations(z, keep), pose_map, train=train)

  def __call__(self, source, x_t, t, keep, target_box=None, pose_keep=None, train: bool = False,
               source_rays=None, target_rays=None, source_mask=None):
    _, z = self.encode(source, train=train, source_rays=source_rays, source_mask=source_mask)
    return self.denoise(x_t, t, z, keep, target_box, pose_keep, train=train,
                        target_rays=target_rays)


def pose_channels(pose: str, ray_freqs: int = DEFAULT_RAY_FREQS) -> int:
  """Channels the pose map adds to the decoder input (for pose='rays', also to the encoder's
  input, without the validity channel)."""
  if pose == "rays":
    return layers.ray_channels(ray_freqs) + 1
  return POSE_CHANNELS[pose]


def build_model(model: ml_collections.ConfigDict, *, image_channels: int,
                dtype: Any = jnp.float32) -> SODA:
  """SODA from the `config.model` section (validated by config_checks beforehand)."""
  return _build_2d_model(model, image_channels=image_channels, dtype=dtype).clone(
      ray_freqs=model.get("ray_freqs", DEFAULT_RAY_FREQS))


def _build_2d_model(model: ml_collections.ConfigDict, *, image_channels: int,
                    dtype: Any = jnp.float32) -> SODA:
  """The networks and the 2-D options; `build_model` adds the 3-D ones."""
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
  rays = jnp.zeros((batch_size, image_size, image_size, cameras.RAY_CHANNELS),
                   jnp.float32)  # read by pose='rays'
  return dict(source=x, x_t=x, t=jnp.zeros((batch_size,)),
              keep=jnp.ones((batch_size, num_groups), bool),
              target_box=jnp.tile(jnp.array([[0., 0., 1., 1.]]), (batch_size, 1)),
              pose_keep=jnp.ones((batch_size,), bool),
              source_rays=rays, target_rays=rays)
