"""Decoder building blocks: time embedding, AdaGN res block, attention, pose maps.

Every kernel carries logical axis names (see `soda_jax/sharding.py` for the rules that map them
onto the mesh). Names are the ones that appear in checkpoints and exports: keep them stable.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from soda_jax.data import cameras
from soda_jax.models import convolution
from soda_jax.models import group_norm as group_norm_lib

Dtype = Any

# Logical axis names of each parameter kind. Mesh rules live in the config.
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
DENSE_AXES = ("embed_in", "embed_out")
NORM_AXES = ("norm",)

_conv_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def conv(features: int, kernel: int = 3, stride: int = 1, *, zero_init: bool = False,
         dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  """A SAME-padded NHWC conv with logically-partitioned kernel and bias."""
  init = nn.initializers.zeros if zero_init else _conv_init
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding="SAME", dtype=dtype,
      kernel_init=nn.with_logical_partitioning(init, CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      conv_general_dilated=convolution.conv_general_dilated, name=name)


def _dense_inits(zero_init: bool):
  """(kernel_init, bias_init) of every dense layer, with their logical axes."""
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return (nn.with_logical_partitioning(init, DENSE_AXES),
          nn.with_logical_partitioning(nn.initializers.zeros, ("embed_out",)))


def dense(features: int, *, zero_init: bool = False, dtype: Dtype = jnp.float32,
          name: Optional[str] = None) -> nn.Dense:
  kernel_init, bias_init = _dense_inits(zero_init)
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init,
                  name=name)


def group_norm(num_groups: int, name: Optional[str] = None) -> group_norm_lib.GroupNorm:
  """The decoder's GroupNorm (float32 statistics; its affine, AdaGN and SiLU fused in one
  custom-VJP op: models/group_norm.py). Called as norm(x, mul=None, add=None, act=None)."""
  return group_norm_lib.GroupNorm(num_groups=num_groups, epsilon=1e-5, param_axes=NORM_AXES,
                                  name=name)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of continuous t in [0, 1], scaled to the DDPM range [0, 1000]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]  # (B, half)
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb  # (B, dim)


def box_to_pose_map(box: jax.Array, keep: jax.Array, height: int, width: int) -> jax.Array:
  """2-D "pose" of a target view: where each target pixel lies in the source view's frame.

  box: (B, 4) = (y0, x0, y1, x1) of the target crop in the source view's normalised [0, 1]
  coordinates (x0 > x1 encodes a horizontal flip). keep: (B,) bool, False = pose dropped.
  Returns (B, H, W, 3): source-frame (y, x) in [-1, 1] per target pixel, plus a validity channel
  that is 1 where the pose is given, so a dropped pose (all zeros) is never confused with
  "the centre of the source".
  """
  box = box.astype(jnp.float32)
  fy = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height  # pixel centres in [0, 1]
  fx = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  ys = box[:, 0:1] + (box[:, 2:3] - box[:, 0:1]) * fy[None]  # (B, H)
  xs = box[:, 1:2] + (box[:, 3:4] - box[:, 1:2]) * fx[None]  # (B, W)
  yy = jnp.broadcast_to(ys[:, :, None], (box.shape[0], height, width))
  xx = jnp.broadcast_to(xs[:, None, :], (box.shape[0], height, width))
  pose = jnp.stack([2 * yy - 1, 2 * xx - 1, jnp.ones_like(yy)], axis=-1)
  return jnp.where(keep[:, None, None, None], pose, 0.0)


def embed_rays(rays: jax.Array, num_freqs: int) -> jax.Array:
  """Per-pixel rays (..., 6) (Plucker by default, see data/cameras.py) -> Fourier features
  [rays, sin(2^i pi rays), cos(2^i pi rays)], i < num_freqs: (..., ray_channels(num_freqs))."""
  return cameras.fourier_embed(rays.astype(jnp.float32), num_freqs)


def ray_channels(num_freqs: int) -> int:
  return cameras.fourier_channels(6, num_freqs)


def rays_to_pose_map(rays: jax.Array, keep: jax.Array, num_freqs: int) -> jax.Array:
  """3-D pose of a target view: its per-pixel rays (B, H, W, 6), Fourier-embedded, plus a
  validity channel, as `box_to_pose_map` does for the 2-D box. keep: (B,) bool, False = pose
  dropped: the map is then exact zeros (a `where`), whatever the rays hold.
  Returns (B, H, W, ray_channels(num_freqs) + 1)."""
  emb = embed_rays(rays, num_freqs)
  pose = jnp.concatenate([emb, jnp.ones(emb.shape[:-1] + (1,), emb.dtype)], axis=-1)
  return jnp.where(keep[:, None, None, None], pose, 0.0)


class TimeEmbed(nn.Module):
  """t -> sinusoid -> MLP (the ADM time embedding), width 4 * base_channels."""
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    emb = timestep_embedding(t, self.dim // 4)
    emb = dense(self.dim, dtype=self.dtype, name="dense_0")(emb)
    return dense(self.dim, dtype=self.dtype, name="dense_1")(nn.silu(emb))


class Dropout(nn.Module):
  """Dropout whose keep decisions are 16-bit: each 32-bit random word decides two elements.

  Why: threefry bits dominate dropout on CPU (nn.Dropout at (16, 32, 32, 128) on one core: 16.7
  ms, against 0.6 ms for a multiply), and 16 bits resolve any rate to 1/65536; half the words
  took it to 10.4 ms (docs/benchmarks.md, "Session 31"). The words keep x's leading axes, so a
  batch-sharded x gets batch-sharded bits. The rate is rounded to k/65536 and kept elements are
  scaled by the rounded keep probability, so E[out] = x exactly. Draws from the "dropout" rng.
  """
  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x):
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"Dropout: rate={self.rate} is not in [0, 1)")
    threshold = round(self.rate * 65536)
    if self.deterministic or threshold == 0:
      return x
    c = x.shape[-1]
    words = jax.random.bits(self.make_rng("dropout"), x.shape[:-1] + ((c + 1) // 2,),
                            jnp.uint32)
    u16 = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :c]
    keep_prob = 1.0 - threshold / 65536
    return jnp.where(u16 >= threshold, x / jnp.asarray(keep_prob, x.dtype),
                     jnp.zeros((), x.dtype))


class ResBlock(nn.Module):
  """ADM res block with AdaGN on the second norm, modulated by time and by a latent sub-vector.

    h = conv(silu(GN(x)))
    h = GN(h) * (1 + s_t) + b_t          # time
    h = h * (1 + s_z) + b_z              # latent; (s_z, b_z) = keep * Dense(z_sub)
    out = skip(x) + conv_0init(dropout(silu(h)))

  A masked sub-vector (keep=False) gives s_z = b_z = 0 exactly, whatever its values: its layers
  run unmodulated (selected with `where`, so even inf/nan in a masked sub-vector cannot leak).
  """
  features: int
  num_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  latent_init: str = "lecun"  # 'lecun' | 'zero': init of latent_proj (soda.LATENT_INITS)

  @nn.compact
  def __call__(self, x, t_emb, z_sub, z_keep, train: bool):
    # x: (B, H, W, Cin); t_emb: (B, T); z_sub: (B, d) or None; z_keep: (B,) bool.
    h = group_norm(self.num_groups, "norm_0")(x, act="silu").astype(self.dtype)
    h = conv(self.features, dtype=self.dtype, name="conv_0")(h)
    st, bt = jnp.split(dense(2 * self.features, dtype=self.dtype, name="time_proj")(
        nn.silu(t_emb)).astype(jnp.float32), 2, axis=-1)  # (B, F) each
    mul, add = 1 + st, bt
    if z_sub is not None:
      mod = dense(2 * self.features, zero_init=self.latent_init == "zero", dtype=self.dtype,
                  name="latent_proj")(z_sub)
      mod = jnp.where(z_keep[:, None], mod, jnp.zeros_like(mod))
      sz, bz = jnp.split(mod.astype(jnp.float32), 2, axis=-1)
      # (h (1 + s_t) + b_t)(1 + s_z) + b_z, folded into one scale and shift per channel.
      mul, add = mul * (1 + sz), add * (1 + sz) + bz
    h = group_norm(self.num_groups, "norm_1")(h, mul, add, act="silu").astype(self.dtype)
    h = Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.features, zero_init=True, dtype=self.dtype, name="conv_1")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, kernel=1, dtype=self.dtype, name="skip")(x)
    return x.astype(self.dtype) + h


class _DenseParams(nn.Module):
  """A `dense` layer's kernel and bias (same names, shapes, init and logical axes: checkpoints
  and exports see a plain Dense), returned instead of applied, for a caller that folds a
  constant into them first."""
  features: int
  zero_init: bool = False

  @nn.compact
  def __call__(self, c_in: int):
    kernel_init, bias_init = _dense_inits(self.zero_init)
    return (self.param("kernel", kernel_init, (c_in, self.features), jnp.float32),
            self.param("bias", bias_init, (self.features,), jnp.float32))


class AttnBlock(nn.Module):
  """Full self-attention over H*W positions with a zero-initialised output projection.

  Written for XLA:CPU's dot emitters as much as for the accelerators: one (B*L, C) x (C, 3C)
  matmul for q, k and v with the 1/sqrt(dh) scale folded into q's columns of the kernel, and
  attention on (B, L, heads, dh) slices of it (no head-dim einsum at all for one head). One
  16 px, 256-channel block at batch 16, forward + gradient on one CPU core: 93 -> 72 ms
  (1 head), 111 -> 99 ms (4 heads) against the head-major einsum form it replaced
  (docs/benchmarks.md, "Session 31"). Logits and softmax are float32.
  """
  num_heads: int = 0  # 0 -> derived from head_dim
  head_dim: int = 64
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads = self.num_heads or max(1, c // self.head_dim)
    if c % heads:
      raise ValueError(f"AttnBlock: channels={c} not divisible by num_heads={heads}")
    length, dh = hgt * wid, c // heads
    h = group_norm(self.num_groups, "norm")(x).astype(self.dtype).reshape(b * length, c)
    kernel, bias = _DenseParams(3 * c, name="qkv")(c)
    scale = jnp.concatenate([jnp.full((c,), dh ** -0.5), jnp.ones((2 * c,))])
    qkv = h @ (kernel * scale).astype(self.dtype) + (bias * scale).astype(self.dtype)
    q, k, v = (qkv[:, i * c:(i + 1) * c].reshape(b, length, heads, dh) for i in range(3))
    if heads == 1:
      logits = jnp.einsum("bqd,bkd->bqk", q[:, :, 0], k[:, :, 0],
                          preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bqk,bkd->bqd", probs, v[:, :, 0])
    else:
      logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
    kernel, bias = _DenseParams(c, zero_init=True, name="out")(c)
    out = out.reshape(b * length, c) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
    return x + out.reshape(b, hgt, wid, c).astype(x.dtype)


class Downsample(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Strided 3x3 conv; odd sizes round up (SAME padding), e.g. 7 -> 4.
    return conv(self.features, stride=2, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, out_hw):
    # Nearest x2, then crop to the skip connection's size (undoes the round-up of odd sizes).
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, :out_hw[0], :out_hw[1]]
    return conv(self.features, dtype=self.dtype, name="conv")(x)
