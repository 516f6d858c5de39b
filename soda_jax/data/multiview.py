"""Posed multi-view objects for 3-D novel view synthesis: an embedded synthetic dataset, and the
example format shared by every multi-view source (this one and the readers in
`multiview_readers.py`).

A *multi-view source* is random access by object, with cameras in the conventions of
`cameras.py` (OpenCV world-to-camera, pixel intrinsics for the source's own `image_size`):

  len(src)                      number of objects
  src.image_size                S: every image is (S, S, 3)
  src.num_views(i)              V_i views of object i
  src.cameras(i)                (w2c float32 (V_i, 4, 4), K float32 (V_i, 3, 3))
  src.images(i, views)          uint8 (len(views), S, S, 3)

`sample_example(src, i, rng, K)` draws K source views and one other target view of object i and
returns numpy arrays (images in [-1, 1], 6-channel ray maps). It is a pure function of
(src, i, rng state), so `grain.MapDataset.range(len(src)).seed(s).shuffle().random_map(
NovelViewTransform(src, K))` gives reproducible, checkpointable streams.

The synthetic objects (`SyntheticMultiView`) exist so that the 3-D path can be built and tested
without downloads: 2-4 spheres, boxes and cylinders with random sizes, poses and colours, lit by
a fixed directional light (Lambertian + ambient, so a surface point has the same colour in every
view, as in the real datasets), ray cast in numpy on a white background from a camera ring
(24 azimuths x 2 elevations, NMR's distance and field of view). Object i is a pure function of
(seed, object id); train and test hold disjoint object ids (`split_object_ids`), so test
measures generalisation to unseen objects, as NMR/SRN do.

Speed, measured (`images(i, range(48))` on 20 fresh objects, ms per view, numpy in one process,
`nice -n 19`; `lscpu`: "AMD EPYC" family 25, 2 cores, shared, load average 7-9 at the time; the
range of 6 runs in two sittings): 32x32 1.0-1.5 (supersample 1), 5.1-5.6 (supersample 2, the
default); 64x64 3.9-4.6 and 15.9-19.0. A cached view costs ~0.01-0.02 ms; `sample_example` with
K = 3 on cached views 1.9-2.4 ms at 32x32 and 4.1-7.1 ms at 64x64. Each (object, view) is
rendered once and kept in a bounded per-source cache. Framing: over 100 train objects at
32x32, 6.4% of views touch the image border; objects cover 24% of the pixels on average.
"""
import collections
import dataclasses
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from soda_jax.data import cameras, views

BACKGROUND = (1.0, 1.0, 1.0)  # white, as NMR and SRN: +1 in the [-1, 1] model range
LIGHT_DIR = (0.4, 1.0, 0.6)  # towards the light (world, +y up); normalised below
AMBIENT = 0.3  # shade = colour * (AMBIENT + (1 - AMBIENT) * max(0, n . l))
SPHERE, BOX, CYLINDER = 0, 1, 2
KINDS = ("sphere", "box", "cylinder")
_RAYS_PER_CAST = 16384
TEST_ID_OFFSET = 1_000_000  # test object ids start here: growing the train set never eats them


# --------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class Scene:
  """Primitives of one object, as arrays (P = number of primitives).

  kind (P,) int: SPHERE | BOX | CYLINDER; center (P, 3); rotation (P, 3, 3) local -> world;
  size (P, 3): sphere (r, -, -), box half extents, cylinder (radius, half height along local y,
  -); color (P, 3) albedo in [0, 1].
  """
  kind: np.ndarray
  center: np.ndarray
  rotation: np.ndarray
  size: np.ndarray
  color: np.ndarray


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q *= np.sign(np.diag(r))  # uniform (Haar) rotation
  if np.linalg.det(q) < 0:
    q[:, 0] *= -1
  return q


def make_scene(object_id: int, seed: int = 0) -> Scene:
  """Object `object_id`: 2-4 primitives, centres within +-0.3 of the origin (the first within
  +-0.09), extents up to ~0.55: mostly inside the +-0.73 that the NMR-like ring frames."""
  rng = np.random.default_rng([int(seed), int(object_id)])
  n = int(rng.integers(2, 5))
  kind = rng.integers(0, 3, n)
  size = np.zeros((n, 3))
  for p, k in enumerate(kind):
    if k == SPHERE:
      size[p, 0] = rng.uniform(0.18, 0.38)
    elif k == BOX:
      size[p] = rng.uniform(0.1, 0.32, 3)
    else:
      size[p, :2] = rng.uniform(0.1, 0.26), rng.uniform(0.15, 0.38)
  center = rng.uniform(-0.3, 0.3, (n, 3))
  center[0] *= 0.3  # the first primitive near the middle: objects stay in frame
  rotation = np.stack([_random_rotation(rng) for _ in range(n)])
  color = rng.uniform(0.1, 0.95, (n, 3))
  return Scene(kind=kind, center=center, rotation=rotation, size=size, color=color)


def sphere_scene(radius: float = 1.0, center=(0.0, 0.0, 0.0), color=(0.8, 0.2, 0.2)) -> Scene:
  """One sphere: a scene whose silhouette has a closed form (tests)."""
  return Scene(kind=np.array([SPHERE]), center=np.asarray([center], np.float64),
               rotation=np.eye(3)[None], size=np.array([[radius, 0.0, 0.0]]),
               color=np.asarray([color], np.float64))


# --------------------------------------------------------------------------- ray casting


def _hit_sphere(o, d, r):
  """Local-frame rays (N, 3) vs a sphere of radius r at 0 -> t (N,) (inf = miss), normal (N, 3)."""
  b = np.einsum("ni,ni->n", o, d)
  c = np.einsum("ni,ni->n", o, o) - r * r
  disc = b * b - c
  t = -b - np.sqrt(np.maximum(disc, 0.0))
  t = np.where((disc >= 0) & (t > 0), t, np.inf)
  return t, (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d) / r


def _hit_box(o, d, half):
  """Slab test against the axis-aligned box [-half, half] (local frame)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    inv = 1.0 / np.where(d == 0, 1e-30, d)
    t1, t2 = (-half - o) * inv, (half - o) * inv
  t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
  axis = np.argmax(t_near, axis=1)
  t0 = t_near.max(axis=1)
  t = np.where((t_far.min(axis=1) >= t0) & (t0 > 0), t0, np.inf)
  normal = np.zeros_like(o)
  rows = np.arange(o.shape[0])
  normal[rows, axis] = -np.sign(d[rows, axis])
  return t, normal


def _hit_cylinder(o, d, radius, half_h):
  """Capped cylinder around the local y axis, |y| <= half_h."""
  a = d[:, 0] ** 2 + d[:, 2] ** 2
  b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
  c = o[:, 0] ** 2 + o[:, 2] ** 2 - radius ** 2
  disc = b * b - a * c
  with np.errstate(divide="ignore", invalid="ignore"):
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    y_side = o[:, 1] + t_side * d[:, 1]
    t_side = np.where((disc >= 0) & (a > 1e-12) & (np.abs(y_side) <= half_h) & (t_side > 0),
                      t_side, np.inf)
    cap_y = -np.sign(d[:, 1]) * half_h  # the cap a ray from outside meets first
    t_cap = (cap_y - o[:, 1]) / d[:, 1]
    px, pz = o[:, 0] + t_cap * d[:, 0], o[:, 2] + t_cap * d[:, 2]
    t_cap = np.where((d[:, 1] != 0) & (px * px + pz * pz <= radius ** 2) & (t_cap > 0),
                     t_cap, np.inf)
  side = t_side <= t_cap
  t = np.minimum(t_side, t_cap)
  p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
  normal = np.where(side[:, None], np.stack([p[:, 0], np.zeros_like(t), p[:, 2]], 1) / radius,
                    np.stack([np.zeros_like(t), np.sign(cap_y), np.zeros_like(t)], 1))
  return t, normal


def _bounding_radius(kind: int, size: np.ndarray) -> float:
  if kind == SPHERE:
    return float(size[0])
  if kind == BOX:
    return float(np.linalg.norm(size))
  return float(np.hypot(size[0], size[1]))


def cast(scene: Scene, origins: np.ndarray, directions: np.ndarray):
  """World rays (N, 3), unit directions -> (rgb (N, 3) in [0, 1], BACKGROUND where missed,
  hit (N,) bool).

  Each primitive is tested exactly only on the rays that pass within its bounding sphere (a
  cheap test that culls most rays: the measured 5-10x of this renderer's speed).
  """
  n_rays = origins.shape[0]
  best = np.full(n_rays, np.inf)
  rgb = np.empty((n_rays, 3))
  rgb[:] = BACKGROUND
  light = np.asarray(LIGHT_DIR) / np.linalg.norm(LIGHT_DIR)
  for kind, c, rot, size, color in zip(scene.kind, scene.center, scene.rotation, scene.size,
                                       scene.color):
    oc = origins - c
    b = np.einsum("ni,ni->n", oc, directions)
    near = b * b - np.einsum("ni,ni->n", oc, oc) + _bounding_radius(kind, size) ** 2 >= 0
    idx = np.flatnonzero(near)
    if idx.size == 0:
      continue
    # world -> local (rot is local -> world; einsum: numpy's (N, 3) @ (3, 3) is slow)
    o = np.einsum("ni,ij->nj", oc[idx], rot)
    d = np.einsum("ni,ij->nj", directions[idx], rot)
    if kind == SPHERE:
      t, n = _hit_sphere(o, d, size[0])
    elif kind == BOX:
      t, n = _hit_box(o, d, size)
    else:
      t, n = _hit_cylinder(o, d, size[0], size[1])
    closer = t < best[idx]
    idx, t, n = idx[closer], t[closer], n[closer]
    best[idx] = t
    shade = AMBIENT + (1 - AMBIENT) * np.maximum(np.einsum("nj,j->n", n, rot.T @ light), 0.0)
    rgb[idx] = color * shade[:, None]
  return rgb, np.isfinite(best)


def render(scene: Scene, w2c: np.ndarray, k: np.ndarray, height: int, width: int,
           supersample: int = 2) -> Tuple[np.ndarray, np.ndarray]:
  """Ray cast V views at once: w2c (V, 4, 4), k (V, 3, 3) or (3, 3) for the (H, W) image.

  Returns rgb float32 (V, H, W, 3) in [0, 1] and alpha float32 (V, H, W) (covered fraction).
  `supersample` s casts s x s rays per pixel (the pixel-centre grid of the s-times larger image)
  and averages them: edges are anti-aliased like a real rendering's.
  """
  w2c = np.asarray(w2c, np.float64).reshape(-1, 4, 4)
  v, s = w2c.shape[0], int(supersample)
  k = np.broadcast_to(np.asarray(k, np.float64), (v, 3, 3))
  k_s = cameras.resize_intrinsics(k, (height, width), (height * s, width * s))
  # ~16k rays per cast: measured faster per view than one big batch (cache-sized temporaries).
  chunk = max(1, _RAYS_PER_CAST // (height * s * width * s))
  rgb, hit = [], []
  for lo in range(0, v, chunk):
    o, d = cameras.pixel_rays(w2c[lo:lo + chunk], k_s[lo:lo + chunk], height * s, width * s)
    c, h = cast(scene, o.reshape(-1, 3).astype(np.float64), d.reshape(-1, 3).astype(np.float64))
    rgb.append(c)
    hit.append(h)
  rgb = np.concatenate(rgb).reshape(v, height, s, width, s, 3).mean(axis=(2, 4))
  alpha = np.concatenate(hit).reshape(v, height, s, width, s).mean(axis=(2, 4))
  return rgb.astype(np.float32), alpha.astype(np.float32)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the source


def split_object_ids(split: str, num_objects: int) -> np.ndarray:
  """Object ids of a split: train 0..n-1, test TEST_ID_OFFSET.. (disjoint for any n)."""
  if split == "train":
    return np.arange(num_objects)
  if split == "test":
    return TEST_ID_OFFSET + np.arange(num_objects)
  raise ValueError(f"split={split!r} is not 'train' or 'test'")


class SyntheticMultiView:
  """Generated posed objects (a multi-view source, see the module docstring).

  Every object shares one camera ring; views are rendered on first use and cached (at most
  `max_cached_views` images, least recently used evicted; 3 KB each at 32x32). The cache is
  per process and is not pickled: grain workers each fill their own.
  """

  def __init__(self, split: str = "train", num_objects: int = 1000, image_size: int = 32,
               seed: int = 0, supersample: int = 2, num_azimuths: int = 24,
               elevations_deg: Sequence[float] = (15.0, 30.0), radius: float = 2.732,
               fov_deg: float = 30.0, max_cached_views: int = 100_000):
    self.split = split
    self.object_ids = split_object_ids(split, int(num_objects))
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.supersample = int(supersample)
    self.max_cached_views = int(max_cached_views)
    self.w2c = cameras.ring_cameras(num_azimuths, elevations_deg, radius).astype(np.float32)
    self.views_per_ring = int(num_azimuths)  # view e * A + a: ring e (nvs.turntable_views)
    k = cameras.intrinsics_from_fov(fov_deg, self.image_size, self.image_size)
    self.k = np.broadcast_to(k, (len(self.w2c), 3, 3)).astype(np.float32)
    self._init_cache()

  def _init_cache(self):
    self._cache: "collections.OrderedDict[Tuple[int, int], np.ndarray]" = (
        collections.OrderedDict())
    self._lock = threading.Lock()  # grain may read from several threads

  def __getstate__(self) -> Dict[str, Any]:
    state = dict(self.__dict__)
    del state["_cache"], state["_lock"]
    return state

  def __setstate__(self, state: Dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return len(self.object_ids)

  def num_views(self, i: int) -> int:
    return len(self.w2c)

  def cameras(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
    return self.w2c, self.k

  def scene(self, i: int) -> Scene:
    return make_scene(int(self.object_ids[i]), self.seed)

  def images(self, i: int, view_ids: Sequence[int]) -> np.ndarray:
    """uint8 (len(view_ids), S, S, 3); views not yet cached are rendered in one call."""
    view_ids = [int(v) for v in view_ids]
    with self._lock:
      missing = sorted({v for v in view_ids if (i, v) not in self._cache})
    if missing:
      rgb, _ = render(self.scene(i), self.w2c[missing], self.k[missing], self.image_size,
                      self.image_size, self.supersample)
      with self._lock:
        for v, img in zip(missing, to_uint8(rgb)):
          self._cache[(i, v)] = img
    with self._lock:
      out = []
      for v in view_ids:
        # A view evicted between render and read (tiny cache, many threads) is re-rendered.
        img = self._cache.get((i, v))
        if img is None:
          img = to_uint8(render(self.scene(i), self.w2c[v:v + 1], self.k[v:v + 1],
                                self.image_size, self.image_size, self.supersample)[0])[0]
        self._cache[(i, v)] = img
        self._cache.move_to_end((i, v))
        out.append(img)
      while len(self._cache) > self.max_cached_views:
        self._cache.popitem(last=False)
    return np.stack(out)

  def __repr__(self) -> str:
    return (f"SyntheticMultiView(split={self.split!r}, n={len(self)}, size={self.image_size}, "
            f"views={len(self.w2c)}, seed={self.seed})")


# --------------------------------------------------------------------------- examples


def sample_example(src: Any, index: int, rng: np.random.Generator, num_source_views: int = 1,
                   ray_kind: str = "plucker",
                   min_source_views: Optional[int] = None) -> Dict[str, np.ndarray]:
  """K source views and one different target view of object `index`, drawn with `rng`.

  Returns numpy arrays (S = src.image_size, K = num_source_views):
    source (K, S, S, 3) float32 in [-1, 1]     source_rays (K, S, S, 6) float32
    target (S, S, 3) float32 in [-1, 1]        target_rays (S, S, 6) float32
    source_views (K,) int32, target_view () int32, index () int32
    source_mask (K,) bool: the first k views count, k ~ U{min_source_views..K} (all K when
      min_source_views is None or K). K views are always read, so batches keep one shape; the
      model averages the latents of the counted views only (`SODA.encode`).
  Rays are `cameras.ray_map(kind=ray_kind)`: Plucker (d, o x d) by default, or (o, d).
  """
  v = src.num_views(index)
  if not 1 <= num_source_views < v:
    raise ValueError(f"num_source_views={num_source_views} needs 1 <= K < {v} views "
                     f"(object {index} of {src!r})")
  lo = num_source_views if min_source_views is None else int(min_source_views)
  if not 1 <= lo <= num_source_views:
    raise ValueError(f"min_source_views={min_source_views} needs 1 <= it <= "
                     f"num_source_views={num_source_views}")
  chosen = rng.choice(v, num_source_views + 1, replace=False)  # last = target
  # Drawn after the views, and only when there is a choice: K fixed keeps the old stream.
  k = num_source_views if lo == num_source_views else int(rng.integers(lo, num_source_views + 1))
  imgs = views.to_unit_range(src.images(index, chosen))  # (K + 1, S, S, 3)
  w2c, intr = src.cameras(index)
  s = src.image_size
  rays = cameras.ray_map(w2c[chosen], intr[chosen], s, s, ray_kind)  # (K + 1, S, S, 6)
  return dict(source=imgs[:-1], source_rays=rays[:-1], target=imgs[-1], target_rays=rays[-1],
              source_views=chosen[:-1].astype(np.int32), target_view=np.int32(chosen[-1]),
              index=np.int32(index), source_mask=np.arange(num_source_views) < k)


@dataclasses.dataclass(frozen=True)
class NovelViewTransform:
  """`sample_example` as a grain random map over object indices (picklable)."""
  src: Any
  num_source_views: int = 1
  ray_kind: str = "plucker"
  min_source_views: Optional[int] = None

  def __call__(self, index: int, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    return sample_example(self.src, int(index), rng, self.num_source_views, self.ray_kind,
                          self.min_source_views)
