"""Numpy view sampling from one decoded image (picklable, no JAX: runs in grain workers).

Boxes are (y0, x0, y1, x1) in the image's normalised [0, 1] coordinates, pixel *edges* at k / H:
output pixel (i, j) of an (S, S) view samples the source at
  y = y0 + (i + 0.5) / S * (y1 - y0),   x = x0 + (j + 0.5) / S * (x1 - x0),
the centre convention of PIL's resize (source pixel k's centre is at (k + 0.5) / H). A
horizontally flipped view has x0 > x1: the same formula then describes the mirrored sampling,
so a box is always the exact affine map from view to image, flips included. Boxes are
continuous (sub-pixel), not rounded to whole pixels.
"""
import dataclasses
import io
import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

Box = Tuple[float, float, float, float]  # (y0, x0, y1, x1)
FULL_BOX: Box = (0.0, 0.0, 1.0, 1.0)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's 'L' conversion
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """The view-sampling part of config.data, frozen and picklable."""
  image_size: int = 32
  crop_scale: Tuple[float, float] = (0.2, 1.0)
  crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  color_jitter: float = 0.0  # strength s: factors ~ U[1 - s, 1 + s]; 0 = off
  same_view: bool = False  # target = source (plain auto-encoding ablation)

  @classmethod
  def from_config(cls, data: Any) -> "ViewConfig":
    return cls(image_size=int(data.image_size), crop_scale=tuple(map(float, data.crop_scale)),
               crop_ratio=tuple(map(float, data.get("crop_ratio", (3 / 4, 4 / 3)))),
               flip=bool(data.flip), color_jitter=float(data.color_jitter),
               same_view=bool(data.same_view))


# --------------------------------------------------------------------------- decoding


def to_channels(img: np.ndarray, channels: Optional[int]) -> np.ndarray:
  """(H, W, 1|3) uint8 -> (H, W, channels); None keeps the image's own channel count."""
  c = img.shape[-1]
  if channels is None or channels == c:
    return img
  if channels == 3 and c == 1:
    return np.repeat(img, 3, axis=-1)
  if channels == 1 and c == 3:
    grey = img.astype(np.float32) @ _LUMA
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f"cannot convert {c} channels to {channels}")


def _decode_bytes(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    im = im.convert("L" if im.mode in _GREY_MODES else "RGB")  # forces a full decode
    return np.asarray(im)


def decode(record: Any, channels: Optional[int] = None) -> Optional[np.ndarray]:
  """A record ({'image': ...}) or the image itself -> uint8 (H, W, channels), None if unusable.

  Accepts uint8 arrays (H, W) / (H, W, 1|3|4) and encoded bytes (PNG, JPEG, ... via PIL).
  Corrupt or truncated bytes, empty images and non-image arrays give None: the pipeline skips
  (and counts) them instead of crashing a run. Alpha is dropped.
  """
  image = record.get("image") if isinstance(record, dict) else record
  if image is None:
    return None
  try:
    if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.size == 1:
      image = image.item()
    if isinstance(image, (bytes, bytearray, memoryview)):
      arr = _decode_bytes(bytes(image))
    else:
      arr = np.asarray(image)
      if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iub" or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
          return None
        arr = arr.astype(np.uint8)
  except Exception:  # pylint: disable=broad-except  # any decoder failure = corrupt record
    return None
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
    return None
  if arr.shape[-1] == 4:
    arr = arr[..., :3]
  return to_channels(np.ascontiguousarray(arr), channels)


# --------------------------------------------------------------------------- resampling


class Resampler:
  """One decoded image, converted once to float PIL planes, cut into any number of views.

  Float ('F') planes avoid a second uint8 rounding, and PIL's BILINEAR widens its triangle
  filter when shrinking (antialiasing, as torchvision's PIL path). Near the image border the
  filter window is clipped and renormalised (edge clamp).
  """

  def __init__(self, img: np.ndarray):
    img = np.asarray(img)
    if img.ndim != 3:
      raise ValueError(f"expected (H, W, C), got {img.shape}")
    self.height, self.width, self.channels = img.shape
    self._planes = [Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32))
                    for c in range(self.channels)]

  def crop(self, box: Sequence[float], out_size: int) -> np.ndarray:
    """float32 (out, out, C) in the source's units (0..255) for a normalised box (see module)."""
    y0, x0, y1, x1 = (float(b) for b in box)
    flip_y, flip_x = y1 < y0, x1 < x0
    top, bottom = sorted((y0 * self.height, y1 * self.height))
    left, right = sorted((x0 * self.width, x1 * self.width))
    out = np.stack([np.asarray(p.resize((out_size, out_size), Image.BILINEAR,
                                        box=(left, top, right, bottom)))
                    for p in self._planes], axis=-1)  # (out, out, C)
    if flip_y:
      out = out[::-1]
    if flip_x:
      out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def _as_resampler(img: Union[np.ndarray, Resampler]) -> Resampler:
  return img if isinstance(img, Resampler) else Resampler(img)


def to_unit_range(x: np.ndarray) -> np.ndarray:
  """0..255 -> [-1, 1] float32 (the models' input range)."""
  return (np.asarray(x, np.float32) * (2.0 / 255.0) - 1.0).astype(np.float32)


def sample_box(rng: np.random.Generator, height: int, width: int,
               scale: Tuple[float, float] = (0.08, 1.0),
               ratio: Tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Box:
  """RandomResizedCrop's box (area fraction ~ U(scale), log aspect ~ U(log ratio)), continuous.

  After `attempts` misses (a box that does not fit), the largest centred box whose aspect
  lies within `ratio` (torchvision's fallback).
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))  # width / height
    w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
    if 0 < w <= width and 0 < h <= height:
      y0, x0 = rng.uniform(0, height - h), rng.uniform(0, width - w)
      return (y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width)
  in_ratio = width / height
  w, h = float(width), float(height)
  if in_ratio < ratio[0]:
    h = w / ratio[0]
  elif in_ratio > ratio[1]:
    w = h * ratio[1]
  y0, x0 = (height - h) / 2, (width - w) / 2
  return (y0 / height, x0 / width, (y0 + h) / height, (x0 + w) / width)


def color_jitter(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Brightness, contrast, saturation in random order, factors ~ U[max(0, 1-s), 1+s].

  x: (H, W, C) float in [0, 1]. Saturation is a no-op for C = 1 (greyscale-safe); clipped to
  [0, 1] after each step, as torchvision.
  """
  if strength <= 0:
    return x
  factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
  grey_img = x.shape[-1] == 1
  for k in rng.permutation(3):
    f = factors[k]
    if k == 0:  # brightness
      x = x * f
    elif k == 1:  # contrast: blend with the mean grey level
      m = (x if grey_img else x @ _LUMA).mean()
      x = (x - m) * f + m
    elif not grey_img:  # saturation: blend with the per-pixel grey
      g = (x @ _LUMA)[..., None]
      x = (x - g) * f + g
    x = np.clip(x, 0.0, 1.0)
  return x.astype(np.float32)


def random_resized_crop(img: Union[np.ndarray, Resampler], rng: np.random.Generator,
                        out_size: int, scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False,
                        jitter: float = 0.0) -> Tuple[np.ndarray, Box]:
  """One random view: (float32 (out, out, C) in [-1, 1], box).

  With `flip`, a horizontal flip with probability 0.5, recorded as x0 > x1 in the box.
  """
  res = _as_resampler(img)
  box = sample_box(rng, res.height, res.width, scale, ratio)
  if flip and rng.random() < 0.5:
    box = (box[0], box[3], box[2], box[1])
  view = res.crop(box, out_size)
  if jitter > 0:
    view = color_jitter(view / 255.0, rng, jitter) * 255.0
  return to_unit_range(view), box


def relative_box(box: Sequence[float], frame: Sequence[float]) -> Box:
  """`box` expressed in the normalised coordinates of the view cut by `frame` (both image boxes).

  Both are affine maps view -> image, so this is frame^-1 o box; flips in either carry through.
  """
  y0, x0, y1, x1 = box
  fy0, fx0, fy1, fx1 = frame
  sy, sx = fy1 - fy0, fx1 - fx0
  return ((y0 - fy0) / sy, (x0 - fx0) / sx, (y1 - fy0) / sy, (x1 - fx0) / sx)


def two_views(img: Union[np.ndarray, Resampler], rng: np.random.Generator,
              cfg: ViewConfig) -> dict:
  """Source and target views of one image, and where the target lies in the source's frame.

  Returns source, target: float32 (S, S, C) in [-1, 1]; target_box: float32 (4,) = the target's
  box in the *source view's* normalised coordinates (values outside [0, 1] where the target
  reaches beyond what the encoder saw). same_view: target = source, target_box = (0, 0, 1, 1).
  """
  res = _as_resampler(img)
  kw = dict(out_size=cfg.image_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
            flip=cfg.flip, jitter=cfg.color_jitter)
  source, source_box = random_resized_crop(res, rng, **kw)
  if cfg.same_view:
    target, target_box = source.copy(), FULL_BOX
  else:
    target, box = random_resized_crop(res, rng, **kw)
    target_box = relative_box(box, source_box)
  return dict(source=source, target=target, target_box=np.asarray(target_box, np.float32))


def center_box(height: int, width: int) -> Box:
  """The largest centred square: the whole image when it is square."""
  s = min(height, width)
  y0, x0 = (height - s) / 2, (width - s) / 2
  return (y0 / height, x0 / width, (y0 + s) / height, (x0 + s) / width)


def center_view(img: np.ndarray, out_size: int) -> np.ndarray:
  """The deterministic evaluation view: centre square (full image if square), resized."""
  res = Resampler(img)
  return to_unit_range(res.crop(center_box(res.height, res.width), out_size))
