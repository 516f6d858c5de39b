"""Pinhole cameras and per-pixel rays: the one place that fixes the 3-D conventions.

Conventions (OpenCV / COLMAP style; every 3-D module and reader converts *to* these):

- Camera frame: x right, y down, z forward (the viewing direction), right-handed.
- Extrinsics are **world-to-camera** 4x4 matrices `w2c = [[R, t], [0, 0, 0, 1]]`:
  x_cam = R @ x_world + t. The camera centre is C = -R^T t; the rows of R are the camera's
  right / down / forward axes written in world coordinates. `invert_rigid(w2c)` is camera-to-world.
- Intrinsics K (3, 3) are in **pixels**: [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], so a camera-frame
  point (X, Y, Z) lands at u = fx X / Z + cx (along the width, column), v = fy Y / Z + cy (row).
- Pixel coordinates are continuous with pixel *edges* on integers: pixel (row i, column j)
  covers [j, j + 1) x [i, i + 1) and its centre is (u, v) = (j + 0.5, i + 0.5) -- the convention of
  `views.py` and PIL. A centred principal point is (W / 2, H / 2), and resizing an image by s
  scales fx, fy, cx, cy by exactly s (`resize_intrinsics`), with no half-pixel terms.
- The world frame is whatever the data uses; the generated scenes (`multiview.py`) are +y up,
  like ShapeNet.
- A ray is (origin o, unit direction d) with o = the camera centre for every pixel and
  d = normalise(R^T K^-1 (u, v, 1)) through the pixel centre.
- Plucker coordinates of a ray: (d, m = o x d), 6 numbers. m does not depend on where along the
  ray o sits, and |m| is the ray's distance from the world origin: the same line always gets the
  same 6 numbers, which is why they (rather than origin, direction) are the default ray map.

Everything is numpy except `fourier_embed` and `plucker`, which also take jax arrays (inside
`jit`, for use in the model): they use the input's own array namespace (`x.__array_namespace__()`),
so this module never imports jax and stays cheap in grain workers.
"""
import math
from typing import Sequence, Tuple

import numpy as np

RAY_KINDS = ("plucker", "origin_direction")
RAY_CHANNELS = 6  # per pixel: Plucker (d, o x d) or (o, d), before any Fourier embedding
WORLD_UP = (0.0, 1.0, 0.0)


def _xp(x):
  """The array module of x (numpy or jax.numpy, tracers included); numpy for lists/scalars."""
  return x.__array_namespace__() if hasattr(x, "__array_namespace__") else np


# --------------------------------------------------------------------------- extrinsics


def look_at(eye: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
            up: Sequence[float] = WORLD_UP) -> np.ndarray:
  """World-to-camera (4, 4) of a camera at `eye` looking at `target`, image-up close to `up`.

  forward = normalise(target - eye), right = normalise(forward x up), down = forward x right:
  (right, down, forward) is right-handed and `down` has a negative component along `up`, so
  `up` points to the top of the image. `up` must not be parallel to the viewing direction.
  """
  eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
  forward = target - eye
  forward /= np.linalg.norm(forward)
  right = np.cross(forward, up)
  norm = np.linalg.norm(right)
  if norm < 1e-9:
    raise ValueError(f"look_at: up={up.tolist()} is parallel to the view direction "
                     f"{forward.tolist()}")
  right /= norm
  down = np.cross(forward, right)
  w2c = np.eye(4)
  w2c[:3, :3] = np.stack([right, down, forward])  # rows: camera axes in world coordinates
  w2c[:3, 3] = -w2c[:3, :3] @ eye
  return w2c


def invert_rigid(m: np.ndarray) -> np.ndarray:
  """Inverse of rigid (..., 4, 4) [[R, t], [0, 1]]: [[R^T, -R^T t], [0, 1]], exact and cheap."""
  m = np.asarray(m, np.float64)
  r_t = np.swapaxes(m[..., :3, :3], -1, -2)
  out = np.zeros_like(m)
  out[..., :3, :3] = r_t
  out[..., :3, 3] = -np.einsum("...ij,...j->...i", r_t, m[..., :3, 3])
  out[..., 3, 3] = 1.0
  return out


def camera_centers(w2c: np.ndarray) -> np.ndarray:
  """(..., 4, 4) world-to-camera -> (..., 3) camera centres C = -R^T t in world coordinates."""
  return invert_rigid(w2c)[..., :3, 3]


def ring_cameras(num_azimuths: int = 24, elevations_deg: Sequence[float] = (15.0, 30.0),
                 radius: float = 2.732,
                 target: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
  """(E * A, 4, 4) world-to-camera matrices on rings around `target`, all looking at it.

  View index = e * num_azimuths + a. Azimuth a * 360 / A degrees turns from +z towards +x about
  the up axis (+y); elevation is above the horizontal plane. The default radius 2.732 and
  24 azimuths follow the NMR renderings (one ring at 30 degrees there; two rings here so that
  views differ in elevation too).
  """
  out = []
  for el in np.deg2rad(np.asarray(elevations_deg, np.float64)):
    for az in 2 * np.pi * np.arange(num_azimuths) / num_azimuths:
      offset = radius * np.array([math.cos(el) * math.sin(az), math.sin(el),
                                  math.cos(el) * math.cos(az)])
      out.append(look_at(np.asarray(target, np.float64) + offset, target, WORLD_UP))
  return np.stack(out)


# --------------------------------------------------------------------------- intrinsics


def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> np.ndarray:
  """(3, 3) K with horizontal field of view `fov_deg`, square pixels, centred principal point."""
  fx = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
  return np.array([[fx, 0.0, width / 2.0], [0.0, fx, height / 2.0], [0.0, 0.0, 1.0]])


def resize_intrinsics(k: np.ndarray, from_hw: Tuple[int, int],
                      to_hw: Tuple[int, int]) -> np.ndarray:
  """K of an (H, W) image -> K of the same view resized to `to_hw` (exact with edge pixels)."""
  k = np.array(k, np.float64)
  sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
  k[..., 0, :] *= sx
  k[..., 1, :] *= sy
  return k


def ndc_to_pixel_intrinsics(camera_mat: np.ndarray, height: int, width: int,
                            align_corners: bool = False) -> np.ndarray:
  """An intrinsics matrix in normalised image coordinates [-1, 1] (3x3 or 4x4) -> pixel K.

  align_corners=False: -1 and +1 are the image *edges* (pixelNeRF's reading of the DVR/NMR
  `camera_mat`: focal * W / 2). True: they are the centres of the first and last pixels (DVR's
  own `arange_pixels`), focal * (W - 1) / 2. The two differ by one pixel over the width.
  """
  m = np.asarray(camera_mat, np.float64)
  fx, fy, cx, cy = m[..., 0, 0], m[..., 1, 1], m[..., 0, 2], m[..., 1, 2]
  if align_corners:
    sx, sy, off = (width - 1) / 2.0, (height - 1) / 2.0, 0.5
  else:
    sx, sy, off = width / 2.0, height / 2.0, 0.0
  k = np.zeros(m.shape[:-2] + (3, 3))
  k[..., 0, 0], k[..., 1, 1] = fx * sx, fy * sy
  k[..., 0, 2], k[..., 1, 2] = (cx + 1) * sx + off, (cy + 1) * sy + off
  k[..., 2, 2] = 1.0
  return k


# --------------------------------------------------------------------------- projection, rays


def project(points: np.ndarray, w2c: np.ndarray, k: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """World points (..., 3) -> pixel coordinates (..., 2) as (u, v) and camera depth z (...)."""
  p = np.asarray(points, np.float64)
  cam = p @ np.asarray(w2c)[:3, :3].T + np.asarray(w2c)[:3, 3]
  uvw = cam @ np.asarray(k).T
  return uvw[..., :2] / uvw[..., 2:3], cam[..., 2]


def pixel_rays(w2c: np.ndarray, k: np.ndarray, height: int,
               width: int) -> Tuple[np.ndarray, np.ndarray]:
  """Rays through every pixel centre of (..., 4, 4) cameras with (..., 3, 3) intrinsics.

  Returns origins, directions: float32 (..., H, W, 3) each, directions unit length. Leading
  dims of w2c and k broadcast (many views of one intrinsics, or one view per K).
  """
  w2c = np.asarray(w2c, np.float64)
  k = np.asarray(k, np.float64)
  # pixel (u, v, 1) -> world direction is the one matrix R^T K^-1, (..., 3, 3)
  m = np.swapaxes(w2c[..., :3, :3], -1, -2) @ np.linalg.inv(k)
  m = m[..., None, None, :, :]  # (..., 1, 1, 3, 3) against the (H, W) grid
  v = (np.arange(height) + 0.5)[:, None, None]  # (H, 1, 1) pixel-centre rows
  u = (np.arange(width) + 0.5)[None, :, None]  # (1, W, 1) pixel-centre columns
  dirs = m[..., 0] * u + m[..., 1] * v + m[..., 2]  # (..., H, W, 3)
  dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
  origins = np.broadcast_to(camera_centers(w2c)[..., None, None, :], dirs.shape)
  return origins.astype(np.float32), dirs.astype(np.float32)


def plucker(origins, directions):
  """(d, o x d) for (..., 3) origins and unit directions -> (..., 6); numpy or jax arrays."""
  xp = _xp(directions)
  return xp.concatenate([directions, xp.cross(origins, directions)], axis=-1)


def ray_map(w2c: np.ndarray, k: np.ndarray, height: int, width: int,
            kind: str = "plucker") -> np.ndarray:
  """Per-pixel 6-channel ray map float32 (..., H, W, 6): Plucker (d, o x d) or (o, d)."""
  if kind not in RAY_KINDS:
    raise ValueError(f"ray kind={kind!r} is not one of {RAY_KINDS}")
  o, d = pixel_rays(w2c, k, height, width)
  out = plucker(o, d) if kind == "plucker" else np.concatenate([o, d], axis=-1)
  return out.astype(np.float32)


def fourier_embed(x, num_freqs: int, include_input: bool = True):
  """NeRF-style features [x, sin(2^i pi x), cos(2^i pi x)] for i < num_freqs, on the last axis.

  x: (..., C) numpy or jax array (inside jit too) -> (..., C * (include_input + 2 num_freqs)),
  ordered [x | sin for all (i, c) | cos for all (i, c)], frequency-major. Ray maps are O(1)
  numbers (|d| = 1, |m| <= camera distance); the sinusoids let a conv net resolve them finely.
  """
  if not hasattr(x, "__array_namespace__"):
    x = np.asarray(x, np.float32)
  xp = _xp(x)
  freqs = (2.0 ** xp.arange(num_freqs, dtype=x.dtype)) * math.pi  # (L,)
  angles = (x[..., None, :] * freqs[:, None]).reshape(x.shape[:-1] + (num_freqs * x.shape[-1],))
  parts = ([x] if include_input else []) + [xp.sin(angles), xp.cos(angles)]
  return xp.concatenate(parts, axis=-1)


def fourier_channels(channels: int, num_freqs: int, include_input: bool = True) -> int:
  """Channel count of `fourier_embed` for a (..., channels) input."""
  return channels * (int(include_input) + 2 * num_freqs)
