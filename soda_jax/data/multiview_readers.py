"""Readers for the two standard posed-ShapeNet layouts, as multi-view sources (`multiview.py`).

Both convert to the project's conventions (`cameras.py`: OpenCV world-to-camera 4x4, pixel K for
the reader's `image_size`); nothing here is downloaded, users point `root` at their copy.

**NMR** (the DVR release of the Neural Mesh Renderer renderings: 13 ShapeNet classes, 24 views
per object, 64x64; the benchmark of pixelNeRF and SODA):

  root/<synset>/<list_prefix><split>.lst      object names, one a line ('softras_train.lst')
  root/<synset>/<object>/image/0000.png ...   views, file stem = view index
  root/<synset>/<object>/cameras.npz          world_mat_<i>, camera_mat_<i> [, *_inv_<i>]

Assumed, from DVR's code and pixelNeRF's reader of it (no copy of the data here to check):
`world_mat_i` (3x4 or 4x4) is the world-to-camera [R|t] of an OpenCV camera (x right, y down,
z forward): pixelNeRF uses its inverse as camera-to-world and flips y and z to reach OpenGL.
If only `world_mat_inv_i` is present it is taken as camera-to-world. `camera_mat_i` (3x3 or
4x4) holds the intrinsics in normalised image coordinates, [-1, 1] across the image (NMR: focal
cot(15 deg) = 3.73, a 30 degree field of view, principal point 0). pixelNeRF reads -1 / +1 as the
image edges (focal * W / 2), DVR's own pixel grid puts them on the outer pixel centres
(focal * (W - 1) / 2): `align_corners` picks, default the edges. A world matrix that is not a
rotation + translation (e.g. one with K multiplied in, as IDR/NeuS `cameras.npz` files have)
raises, rather than giving silently wrong rays. `scale_mat_i` (absent in NMR) is ignored.

**SRN** (Sitzmann et al.'s ShapeNet cars / chairs, 128x128; one folder per split, e.g.
`cars_train`):

  root/<object>/rgb/000000.png ...    views
  root/<object>/pose/000000.txt       camera-to-world 4x4 (16 numbers, one line or four)
  root/<object>/intrinsics.txt        'f cx cy _' / barycentre / scale / 'H W' (lines 1-4)

Assumed: poses are OpenCV camera-to-world (pixelNeRF multiplies them by diag(1, -1, -1, 1) to get
OpenGL), and (f, cx, cy) are pixels of the H x W image on line 4 (the image's own size if that
line is missing). cx, cy are read in this project's edge convention (pixel j spans [j, j + 1));
a generator with pixel centres on integers would put rays half a pixel off (0.4% of the width
at 128 px).

Images are RGB; an alpha channel is composited over white (both datasets' background), and
images are resized to `image_size` (box filter when shrinking) with K scaled to match.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from soda_jax.data import cameras

_RIGID_TOL = 1e-3


def load_rgb(path: str, image_size: Optional[int] = None) -> np.ndarray:
  """uint8 (S, S, 3): alpha composited over white, resized to `image_size` if given."""
  with Image.open(path) as im:
    im.load()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
      rgba = im.convert("RGBA")
      im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      im.alpha_composite(rgba)
    im = im.convert("RGB")
    if image_size is not None and im.size != (image_size, image_size):
      shrink = image_size < max(im.size)
      im = im.resize((image_size, image_size), Image.BOX if shrink else Image.BILINEAR)
    return np.asarray(im)


def _image_hw(path: str) -> Tuple[int, int]:
  with Image.open(path) as im:
    return im.size[1], im.size[0]


def _as_4x4(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  if m.shape == (3, 4):
    m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
  if m.shape != (4, 4):
    raise ValueError(f"expected a 3x4 or 4x4 matrix, got {m.shape}")
  return m


def _checked_rigid(m: np.ndarray, what: str) -> np.ndarray:
  r = m[:3, :3]
  if not (np.allclose(r @ r.T, np.eye(3), atol=_RIGID_TOL) and np.linalg.det(r) > 0
          and np.allclose(m[3], [0, 0, 0, 1])):
    raise ValueError(f"{what} is not a rotation + translation (R R^T =\n{r @ r.T})")
  return m


def _views_in(folder: str) -> List[Tuple[int, str]]:
  """(view index, stem) of the image files in `folder`, by index."""
  out = []
  for f in os.listdir(folder):
    stem, ext = os.path.splitext(f)
    if ext.lower() in (".png", ".jpg", ".jpeg") and stem.isdigit():
      out.append((int(stem), f))
  return sorted(out)


class _PosedFolders:
  """Shared machinery: per-object view lists and cameras parsed once, images read on demand."""
  image_size: int
  objects: List[str]

  def __init__(self):
    self._parsed: Dict[int, Tuple[List[str], np.ndarray, np.ndarray]] = {}

  def _parse(self, i: int) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """-> (image paths, w2c (V, 4, 4), K (V, 3, 3) for image_size); subclass reads its layout."""
    raise NotImplementedError

  def _object(self, i: int):
    if i not in self._parsed:
      self._parsed[i] = self._parse(i)
    return self._parsed[i]

  def __len__(self) -> int:
    return len(self.objects)

  def num_views(self, i: int) -> int:
    return len(self._object(i)[0])

  def cameras(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
    _, w2c, k = self._object(i)
    return w2c, k

  def images(self, i: int, view_ids: Sequence[int]) -> np.ndarray:
    paths = self._object(i)[0]
    return np.stack([load_rgb(paths[int(v)], self.image_size) for v in view_ids])


# --------------------------------------------------------------------------- NMR (DVR)


def read_nmr_cameras(path: str, view_ids: Sequence[int], image_hw: Tuple[int, int],
                     align_corners: bool = False) -> Tuple[np.ndarray, np.ndarray]:
  """cameras.npz -> (w2c float64 (V, 4, 4), pixel K (V, 3, 3) for an image of `image_hw`)."""
  with np.load(path) as cams:
    w2c, ks = [], []
    for i in view_ids:
      if f"world_mat_{i}" in cams:
        m = _checked_rigid(_as_4x4(cams[f"world_mat_{i}"]), f"{path}: world_mat_{i}")
      elif f"world_mat_inv_{i}" in cams:
        m = cameras.invert_rigid(_checked_rigid(_as_4x4(cams[f"world_mat_inv_{i}"]),
                                                f"{path}: world_mat_inv_{i}"))
      else:
        raise KeyError(f"{path} has no world_mat_{i} (keys: {sorted(cams.files)[:8]} ...)")
      w2c.append(m)
      ks.append(cameras.ndc_to_pixel_intrinsics(np.asarray(cams[f"camera_mat_{i}"]),
                                                *image_hw, align_corners=align_corners))
  return np.stack(w2c), np.stack(ks)


class NMRMultiView(_PosedFolders):
  """NMR / DVR-layout objects of `split` over `categories` (all synset folders if None).

  `list_prefix`: 'softras_' (the SoftRas split that pixelNeRF and later NMR results use) or ''
  (DVR's train/val/test.lst). split=None takes every object folder holding a cameras.npz.
  """

  def __init__(self, root: str, split: Optional[str] = "train", image_size: int = 64,
               categories: Optional[Sequence[str]] = None, list_prefix: str = "softras_",
               align_corners: bool = False):
    super().__init__()
    if not os.path.isdir(root):
      raise FileNotFoundError(f"NMR root {root!r} is not a directory")
    self.root, self.split, self.image_size = root, split, int(image_size)
    self.align_corners = bool(align_corners)
    cats = sorted(categories) if categories else sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.objects, self.categories = [], []
    for cat in cats:
      cat_dir = os.path.join(root, cat)
      if split is None:
        names = sorted(d for d in os.listdir(cat_dir)
                       if os.path.isfile(os.path.join(cat_dir, d, "cameras.npz")))
      else:
        list_path = os.path.join(cat_dir, f"{list_prefix}{split}.lst")
        if not os.path.isfile(list_path):
          continue
        with open(list_path) as f:
          names = [line.strip() for line in f if line.strip()]
      self.objects += [os.path.join(cat_dir, n) for n in names]
      self.categories += [cat] * len(names)
    if not self.objects:
      raise FileNotFoundError(
          f"NMR root {root!r}: no objects for split={split!r} (looked for "
          f"<synset>/{list_prefix}{split}.lst in {cats[:5]}{' ...' if len(cats) > 5 else ''})")

  def _parse(self, i: int):
    obj = self.objects[i]
    found = _views_in(os.path.join(obj, "image"))
    if not found:
      raise FileNotFoundError(f"{obj}/image holds no numbered images")
    paths = [os.path.join(obj, "image", f) for _, f in found]
    hw = _image_hw(paths[0])
    w2c, k = read_nmr_cameras(os.path.join(obj, "cameras.npz"), [v for v, _ in found], hw,
                              self.align_corners)
    k = cameras.resize_intrinsics(k, hw, (self.image_size, self.image_size))
    return paths, w2c.astype(np.float32), k.astype(np.float32)

  def __repr__(self) -> str:
    return (f"NMRMultiView({self.root!r}, split={self.split!r}, n={len(self)}, "
            f"size={self.image_size})")


# --------------------------------------------------------------------------- SRN


def read_srn_intrinsics(path: str) -> Tuple[np.ndarray, Optional[Tuple[int, int]]]:
  """intrinsics.txt -> (pixel K (3, 3), (H, W) it refers to, or None if line 4 is absent)."""
  with open(path) as f:
    lines = [line.split() for line in f if line.strip()]
  f_, cx, cy = (float(x) for x in lines[0][:3])
  hw = (int(float(lines[3][0])), int(float(lines[3][1]))) if len(lines) > 3 else None
  return np.array([[f_, 0.0, cx], [0.0, f_, cy], [0.0, 0.0, 1.0]]), hw


def read_srn_pose(path: str) -> np.ndarray:
  """pose/<view>.txt (camera-to-world, 16 numbers) -> world-to-camera (4, 4)."""
  c2w = _checked_rigid(np.loadtxt(path, dtype=np.float64).reshape(4, 4), path)
  return cameras.invert_rigid(c2w)


class SRNMultiView(_PosedFolders):
  """SRN-layout objects under `root` (one split folder, e.g. '.../cars_train')."""

  def __init__(self, root: str, image_size: int = 128):
    super().__init__()
    if not os.path.isdir(root):
      raise FileNotFoundError(f"SRN root {root!r} is not a directory")
    self.root, self.image_size = root, int(image_size)
    self.objects = sorted(os.path.join(root, d) for d in os.listdir(root)
                          if os.path.isdir(os.path.join(root, d, "rgb")))
    if not self.objects:
      raise FileNotFoundError(f"SRN root {root!r}: no <object>/rgb folders")

  def _parse(self, i: int):
    obj = self.objects[i]
    found = _views_in(os.path.join(obj, "rgb"))
    if not found:
      raise FileNotFoundError(f"{obj}/rgb holds no numbered images")
    paths = [os.path.join(obj, "rgb", f) for _, f in found]
    w2c = np.stack([read_srn_pose(os.path.join(obj, "pose", os.path.splitext(f)[0] + ".txt"))
                    for _, f in found])
    k, hw = read_srn_intrinsics(os.path.join(obj, "intrinsics.txt"))
    k = cameras.resize_intrinsics(k, hw or _image_hw(paths[0]), (self.image_size,) * 2)
    k = np.broadcast_to(k, (len(paths), 3, 3))
    return paths, w2c.astype(np.float32), k.astype(np.float32)

  def __repr__(self) -> str:
    return f"SRNMultiView({self.root!r}, n={len(self)}, size={self.image_size})"
