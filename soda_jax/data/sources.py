"""Random-access image sources for `grain.MapDataset.source`.

Every source has `__len__` and `__getitem__(i) -> {'image': ..., 'label': int}` where 'image' is
a uint8 (H, W, C) array or encoded bytes (decoded later, once, in the pipeline's transform) or
None when the record could not be read at all. Sources never raise on a bad record: the
pipeline skips and counts those, so one corrupt file cannot stop a long run.

Splits accept tfds-style slices for every source ('train[:1000]', 'test[10%:]').
"""
import gzip
import os
import re
import zlib
from typing import Any, Dict, List, Optional, Tuple

import ml_collections
import numpy as np

DEFAULT_IDX_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Posed multi-view objects for 3-D novel view synthesis (data/multiview.py, multiview_readers.py):
# the embedded generated objects, and the NMR / SRN layouts under config.data.folder.
MULTIVIEW_NAMES = ("synthetic_multiview", "nmr", "srn")
# Names handled here rather than by tfds (anything else must be a registered tfds builder).
LOCAL_NAMES = ("fashion_mnist", "synthetic", "folder") + MULTIVIEW_NAMES

_IDX_FILES = {"train": "train", "test": "t10k"}
_SPLIT_RE = re.compile(r"^(?P<base>[\w-]+)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


def parse_split(split: str) -> Tuple[str, slice]:
  """'train[10%:50]' -> ('train', slice) with the bounds still symbolic (see `_resolve`)."""
  m = _SPLIT_RE.match(split.strip())
  if not m:
    raise ValueError(f"split={split!r} is not 'name' or 'name[start:stop]' (ints or percents)")
  return m.group("base"), slice(m.group("start") or None, m.group("stop") or None)


def _resolve(bound: Optional[str], n: int) -> Optional[int]:
  if bound is None:
    return None
  if bound.endswith("%"):
    return int(round(float(bound[:-1]) * n / 100))
  return int(bound)


def slice_range(n: int, sl: slice) -> range:
  """The indices of a length-n split selected by a `parse_split` slice."""
  return range(n)[slice(_resolve(sl.start, n), _resolve(sl.stop, n))]


class _Subset:
  """A contiguous slice of another source, so every source supports split slicing."""

  def __init__(self, parent, sl: slice):
    self.parent = parent
    self._range = slice_range(len(parent), sl)

  def __len__(self) -> int:
    return len(self._range)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    return self.parent[self._range[i]]


def _sliced(source, sl: slice):
  return source if sl.start is None and sl.stop is None else _Subset(source, sl)


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)


def read_idx(path: str) -> np.ndarray:
  """One (optionally gzipped) IDX file -> numpy array with the file's dims (uint8 data only)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
  if zero != b"\x00\x00" or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()})")
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
  return data.reshape(dims)


def idx_paths(split: str, root: str = DEFAULT_IDX_ROOT) -> Tuple[str, str]:
  base, _ = parse_split(split)
  if base not in _IDX_FILES:
    raise ValueError(f"Fashion-MNIST split={split!r}: base must be one of {tuple(_IDX_FILES)}")
  stem = _IDX_FILES[base]
  return (os.path.join(root, f"{stem}-images-idx3-ubyte.gz"),
          os.path.join(root, f"{stem}-labels-idx1-ubyte.gz"))


class FashionMnistIdx:
  """Fashion-MNIST from the IDX files of the Debian package, read once into memory (~55 MB)."""

  def __init__(self, split: str = "train", root: str = DEFAULT_IDX_ROOT):
    image_path, label_path = idx_paths(split, root)
    images = read_idx(image_path)  # (N, 28, 28)
    labels = read_idx(label_path)  # (N,)
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"{image_path} has {images.shape[0]} images, {label_path} "
                       f"{labels.shape[0]} labels")
    idx = np.asarray(slice_range(images.shape[0], parse_split(split)[1]))
    self.images = np.ascontiguousarray(images[idx, :, :, None])  # (N, 28, 28, 1) uint8
    self.labels = labels[idx].astype(np.int32)  # (N,)

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, i: int) -> Dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}

  def __repr__(self) -> str:
    return f"FashionMnistIdx(n={len(self)})"


# --------------------------------------------------------------------------- tfds (ArrayRecord)


class TfdsSource:
  """A `tfds.data_source` with records reduced to {'image', 'label'}; unreadable -> image None."""

  def __init__(self, source, image_key: str = "image", label_key: str = "label"):
    self.source = source
    self.image_key = image_key
    self.label_key = label_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    try:
      record = self.source[i]
    except Exception:  # pylint: disable=broad-except  # a corrupt record is skipped, not fatal
      return {"image": None, "label": -1}
    label = record.get(self.label_key, -1)
    return {"image": record.get(self.image_key), "label": int(np.asarray(label))}

  def __repr__(self) -> str:
    return f"TfdsSource({self.source!r})"


def tfds_prepare_hint(name: str, data_dir: Optional[str]) -> str:
  dd = f" --data_dir={data_dir}" if data_dir else ""
  return (f"prepare it once on a machine with network: `tfds build {name} "
          f"--file_format=array_record{dd}` (then copy the data_dir here)")


def tfds_source(name: str, split: str, data_dir: Optional[str] = None) -> TfdsSource:
  """ArrayRecord data prepared offline; never downloads. Image features arrive as encoded bytes.

  Skipping tfds' own image decoding means the pipeline decodes once (PIL) and a corrupt image
  becomes a skipped record instead of an exception inside tfds.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import
  decoders = None
  try:
    features = tfds.builder(name, data_dir=data_dir or None).info.features
    if isinstance(features["image"], tfds.features.Image):
      decoders = {"image": tfds.decode.SkipDecoding()}
  except Exception:  # pylint: disable=broad-except  # unknown features: let tfds decode
    pass
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                           decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"tfds dataset {name!r} split {split!r} is not available as ArrayRecord under "
        f"data_dir={data_dir or '~/tensorflow_datasets (default)'}; "
        f"{tfds_prepare_hint(name, data_dir)}. tfds said: {type(e).__name__}: {e}") from e
  return TfdsSource(src)


# --------------------------------------------------------------------------- image folders


class ImageFolder:
  """root/<class>/*.png|jpg|jpeg; label = index of the class dir in sorted order.

  Returns encoded bytes (read lazily) so that decoding happens once, in the pipeline.
  """

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"ImageFolder root {root!r} is not a directory")
    self.root = root
    self.classes: List[str] = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files: List[Tuple[str, int]] = []
    for label, cls in enumerate(self.classes):
      d = os.path.join(root, cls)
      self.files += [(os.path.join(d, f), label) for f in sorted(os.listdir(d))
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.files:
      raise FileNotFoundError(f"ImageFolder {root!r}: no {IMAGE_EXTENSIONS} files in "
                              f"class sub-directories {self.classes}")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    path, label = self.files[i]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:  # unreadable file: skipped downstream
      data = None
    return {"image": data, "label": label}

  def __repr__(self) -> str:
    return f"ImageFolder({self.root!r}, n={len(self)}, classes={len(self.classes)})"


# --------------------------------------------------------------------------- synthetic shapes

SHAPES = ("disk", "square", "triangle", "ring", "cross")


class SyntheticShapes:
  """Coloured shapes on a coloured background, label = shape kind; a pure function of (seed, i).

  No files, no memory: fast tests and a dependency-free source for benchmarks. Position, size,
  rotation and colours vary, so crops of one image differ while the class stays recognisable.
  """

  def __init__(self, num_examples: int = 4096, image_size: int = 32, seed: int = 0):
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> Dict[str, Any]:
    if not 0 <= i < self.num_examples:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, int(i)])
    label = int(rng.integers(len(SHAPES)))
    return {"image": render_shape(label, self.image_size, rng), "label": label}

  def __repr__(self) -> str:
    return f"SyntheticShapes(n={self.num_examples}, size={self.image_size}, seed={self.seed})"


def render_shape(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """(size, size, 3) uint8: shape `SHAPES[kind]` with random pose and colours."""
  bg = rng.uniform(0, 0.5, 3)
  fg = rng.uniform(0.5, 1.0, 3)
  cy, cx = rng.uniform(0.35, 0.65, 2) * size
  r = rng.uniform(0.2, 0.35) * size
  theta = rng.uniform(0, 2 * np.pi)
  yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
  dy, dx = yy - cy, xx - cx
  # Rotated frame (u, v) for the shapes with corners.
  u = np.cos(theta) * dx + np.sin(theta) * dy
  v = -np.sin(theta) * dx + np.cos(theta) * dy
  dist = np.hypot(dx, dy)
  name = SHAPES[kind]
  if name == "disk":
    mask = dist <= r
  elif name == "square":
    mask = np.maximum(abs(u), abs(v)) <= r * 0.8
  elif name == "triangle":  # equilateral, circumradius r
    ang = np.arctan2(v, u)
    sector = np.mod(ang, 2 * np.pi / 3) - np.pi / 3
    mask = dist * np.cos(sector) <= r / 2
  elif name == "ring":
    mask = (dist <= r) & (dist >= 0.55 * r)
  else:  # cross
    w = 0.3 * r
    mask = ((abs(u) <= w) & (abs(v) <= r)) | ((abs(v) <= w) & (abs(u) <= r))
  img = np.where(mask[..., None], fg, bg)
  return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- dispatch

# Sources whose records cost no I/O or decoding (the pipeline reads them without threads).
IN_MEMORY_SOURCES = (FashionMnistIdx, SyntheticShapes)


def _tfds_name(name: str) -> Optional[str]:
  """The tfds builder name for config.data.name, or None for the local names."""
  if name.startswith("tfds:"):
    return name[len("tfds:"):]
  return None if name in LOCAL_NAMES else name


def _synthetic_seed(split: str) -> int:
  """Stable, different seeds per split base name, so 'train' and 'test' hold different images."""
  return zlib.crc32(split.encode())


def name_error(name: Any) -> Optional[str]:
  """Why config.data.name is unusable, or None (tfds names are checked against the registry)."""
  if not isinstance(name, str) or not name:
    return f"config.data.name={name!r} must be a non-empty string"
  tfds_name = _tfds_name(name)
  if tfds_name is None:
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import
    tfds.builder_cls(re.split(r"[/:]", tfds_name)[0])
  except Exception:  # pylint: disable=broad-except
    return (f"config.data.name={name!r} is not one of {LOCAL_NAMES}, 'tfds:<name>' or a "
            "registered tfds dataset")
  return None


def config_errors(data: ml_collections.ConfigDict) -> List[str]:
  """Static checks of config.data (no data is read); messages name the key and the value."""
  err = name_error(data.name)
  errs = [err] if err else []
  if data.name in ("folder", "nmr", "srn") and not data.folder:
    errs.append(f"config.data.folder='' must be set when config.data.name={data.name!r}")
  errs += multiview_errors(data)
  for key in ("split", "eval_split"):
    try:
      parse_split(data[key])
    except (ValueError, AttributeError) as e:
      errs.append(f"config.data.{key}={data[key]!r}: {e}")
  if not isinstance(data.image_size, int) or data.image_size < 1:
    errs.append(f"config.data.image_size={data.image_size!r} must be a positive int")
  if data.channels not in (1, 3):
    errs.append(f"config.data.channels={data.channels!r} must be 1 or 3")
  s = tuple(data.crop_scale)
  if len(s) != 2 or not 0 < s[0] <= s[1] <= 1:
    errs.append(f"config.data.crop_scale={s!r} must be (lo, hi) with 0 < lo <= hi <= 1")
  r = tuple(data.crop_ratio)
  if len(r) != 2 or not 0 < r[0] <= r[1]:
    errs.append(f"config.data.crop_ratio={r!r} must be (lo, hi) with 0 < lo <= hi")
  if not isinstance(data.color_jitter, (int, float)) or data.color_jitter < 0:
    errs.append(f"config.data.color_jitter={data.color_jitter!r} must be a number >= 0")
  if not isinstance(data.num_threads, int) or data.num_threads < -1:
    errs.append(f"config.data.num_threads={data.num_threads!r} must be an int >= 0, or -1 (auto)")
  if not isinstance(data.prefetch, int) or data.prefetch < 0:
    errs.append(f"config.data.prefetch={data.prefetch!r} must be an int >= 0")
  return errs


def is_multiview(data: ml_collections.ConfigDict) -> bool:
  """Whether config.data names a posed multi-view dataset (3-D novel view synthesis)."""
  return data.name in MULTIVIEW_NAMES


def multiview_errors(data: ml_collections.ConfigDict) -> List[str]:
  """Static checks of the multi-view keys of config.data (pose/model checks: config_checks)."""
  if not is_multiview(data):
    return []
  errs = []
  for key in ("split", "eval_split"):
    try:
      if parse_split(data[key])[1] != slice(None, None):
        errs.append(f"config.data.{key}={data[key]!r}: multi-view datasets take a plain split "
                    "name (no [start:stop] slice)")
    except (ValueError, AttributeError):
      pass  # reported by config_errors
  if data.channels != 3:
    errs.append(f"config.data.channels={data.channels!r} must be 3 for the multi-view dataset "
                f"config.data.name={data.name!r}")
  k = data.num_source_views
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SOURCE_VIEWS:
    errs.append(f"config.data.num_source_views={k!r} must be an int in [1, {MAX_SOURCE_VIEWS}]")
  lo = data.min_source_views
  top = k if isinstance(k, int) and not isinstance(k, bool) else MAX_SOURCE_VIEWS
  if isinstance(lo, bool) or not isinstance(lo, int) or not 1 <= lo <= top:
    errs.append(f"config.data.min_source_views={lo!r} must be an int in [1, "
                f"num_source_views={k!r}]")
  return errs


MAX_SOURCE_VIEWS = 8  # fewer than any dataset's views per object (NMR: 24)


def multiview_source(data: ml_collections.ConfigDict, split: str):
  """The object source of a multi-view config.data.name for split 'train' | 'val' | 'test'.

  synthetic_multiview: `synthetic_examples` train objects (other splits a quarter), rendered at
  image_size. nmr: folder is the NMR root (SoftRas lists per synset). srn: folder holds one
  directory per split, named <split> or <anything>_<split> ('cars_train', 'cars_test').
  """
  from soda_jax.data import multiview, multiview_readers  # pylint: disable=g-import-not-at-top
  base, _ = parse_split(split)
  if data.name == "synthetic_multiview":
    n = data.synthetic_examples if base == "train" else max(1, data.synthetic_examples // 4)
    return multiview.SyntheticMultiView("train" if base == "train" else "test", n,
                                        data.image_size)
  if not data.folder:
    raise ValueError(f"config.data.folder='' must be set when config.data.name={data.name!r}")
  if data.name == "nmr":
    return multiview_readers.NMRMultiView(data.folder, base, data.image_size)
  if data.name == "srn":
    subs = sorted(d for d in os.listdir(data.folder) if d == base or d.endswith("_" + base))
    if not subs:
      raise FileNotFoundError(f"config.data.folder={data.folder!r} has no directory named "
                              f"{base!r} or '*_{base}' for config.data.name='srn'")
    return multiview_readers.SRNMultiView(os.path.join(data.folder, subs[0]), data.image_size)
  raise ValueError(f"config.data.name={data.name!r} is not one of {MULTIVIEW_NAMES}")


def get_source(data: ml_collections.ConfigDict, split: str):
  """config.data (+ a split such as 'train' or 'test[:1000]') -> a random-access source."""
  name = data.name
  base, sl = parse_split(split)
  if name in MULTIVIEW_NAMES:
    return multiview_source(data, split)
  if name == "synthetic":
    n = data.synthetic_examples if base == "train" else max(1, data.synthetic_examples // 4)
    return _sliced(SyntheticShapes(n, data.image_size, _synthetic_seed(base)), sl)
  if name == "folder":
    if not data.folder:
      raise ValueError("config.data.folder='' must be set when config.data.name='folder'")
    sub = os.path.join(data.folder, base)
    return _sliced(ImageFolder(sub if os.path.isdir(sub) else data.folder), sl)
  if name == "fashion_mnist":
    root = data.get("idx_root") or DEFAULT_IDX_ROOT
    paths = idx_paths(split, root)
    if all(os.path.exists(p) for p in paths):
      return FashionMnistIdx(split, root)
    try:
      return tfds_source("fashion_mnist", split, data.get("tfds_data_dir") or None)
    except (FileNotFoundError, ImportError) as e:
      tfds_dir = data.get("tfds_data_dir")
      raise FileNotFoundError(
          f"config.data.name='fashion_mnist': no IDX files at {list(paths)} "
          f"(config.data.idx_root={root!r}) and no prepared tfds data "
          f"(config.data.tfds_data_dir={tfds_dir!r}). Fix with one of: "
          f"`apt-get update && apt-get install -y dataset-fashion-mnist` (installs the IDX files "
          f"at {DEFAULT_IDX_ROOT}), or {tfds_prepare_hint('fashion_mnist', tfds_dir)}."
          f"\n  tfds error: {e}") from e
  err = name_error(name)
  if err:
    raise ValueError(err)
  return tfds_source(_tfds_name(name), split, data.get("tfds_data_dir") or None)
