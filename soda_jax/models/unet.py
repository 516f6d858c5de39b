"""ADM/DDPM-style UNet decoder whose res blocks are modulated per level by latent sub-vectors."""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from soda_jax.models import layers

Dtype = Any
# One (z_sub (B, d) or None, keep (B,) bool) per modulation group: levels 0..L-1, then the middle.
Modulation = Tuple[Optional[jax.Array], jax.Array]


def level_sizes(height: int, num_levels: int) -> Tuple[int, ...]:
  """Spatial side at each level: SAME stride-2 convs round up (28 -> 14 -> 7 -> 4)."""
  sizes = [height]
  for _ in range(num_levels - 1):
    sizes.append(-(-sizes[-1] // 2))
  return tuple(sizes)


class UNet(nn.Module):
  """Decoder: x_t (+ pose map channels) -> prediction with the same channels as x_t.

  Level i (resolution H / 2^i) has `num_res_blocks` blocks on the way down and
  `num_res_blocks + 1` on the way up; both sides take modulation group i. The middle blocks take
  group L. Attention is used at levels whose side length is in `attention_resolutions`.
  """
  out_channels: int
  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  num_heads: int = 0
  head_dim: int = 64
  dropout: float = 0.0
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False
  latent_init: str = "lecun"

  @nn.compact
  def __call__(self, x, t, mods: Sequence[Modulation], pose_map=None, *, train: bool):
    num_levels = len(self.channel_mult)
    if len(mods) != num_levels + 1:
      raise ValueError(f"UNet needs {num_levels + 1} modulation groups, got {len(mods)}")
    block_cls = nn.remat(layers.ResBlock, static_argnums=(5,)) if self.remat else layers.ResBlock
    kw = dict(num_groups=self.num_groups, dropout=self.dropout, dtype=self.dtype, latent_init=self.latent_init)
    attn_kw = dict(num_heads=self.num_heads, head_dim=self.head_dim, num_groups=self.num_groups,
                   dtype=self.dtype)
    sizes = level_sizes(x.shape[1], num_levels)

    t_emb = layers.TimeEmbed(4 * self.base_channels, dtype=self.dtype, name="time_embed")(t)
    if pose_map is not None:
      x = jnp.concatenate([x, pose_map.astype(x.dtype)], axis=-1)
    h = layers.conv(self.base_channels, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))

    skips = [h]
    for i, mult in enumerate(self.channel_mult):
      z_sub, keep = mods[i]
      for j in range(self.num_res_blocks):
        h = block_cls(mult * self.base_channels, name=f"down_{i}_res_{j}", **kw)(
            h, t_emb, z_sub, keep, train)
        if sizes[i] in self.attention_resolutions:
          h = layers.AttnBlock(name=f"down_{i}_attn_{j}", **attn_kw)(h)
        skips.append(h)
      if i < num_levels - 1:
        h = layers.Downsample(h.shape[-1], dtype=self.dtype,
                              name=f"down_{i}_downsample")(h)
        skips.append(h)

    z_sub, keep = mods[num_levels]
    h = block_cls(h.shape[-1], name="mid_res_0", **kw)(h, t_emb, z_sub, keep, train)
    h = layers.AttnBlock(name="mid_attn", **attn_kw)(h)
    h = block_cls(h.shape[-1], name="mid_res_1", **kw)(h, t_emb, z_sub, keep, train)

    for i in reversed(range(num_levels)):
      z_sub, keep = mods[i]
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block_cls(self.channel_mult[i] * self.base_channels, name=f"up_{i}_res_{j}", **kw)(
            h, t_emb, z_sub, keep, train)
        if sizes[i] in self.attention_resolutions:
          h = layers.AttnBlock(name=f"up_{i}_attn_{j}", **attn_kw)(h)
      if i > 0:
        h = layers.Upsample(h.shape[-1], dtype=self.dtype,
                            name=f"up_{i}_upsample")(h, skips[-1].shape[1:3])
    assert not skips

    h = layers.group_norm(self.num_groups, "norm_out")(h, act="silu").astype(self.dtype)
    h = layers.conv(self.out_channels, zero_init=True, dtype=self.dtype, name="conv_out")(h)
    return h.astype(jnp.float32)
