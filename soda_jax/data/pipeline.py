"""grain input pipeline: source -> shuffled two-view examples -> per-process batches -> jax.Arrays.

Training stream (one per process):

  MapDataset.source(src).map_with_index(attach 'index')   global source index, for auditing
    .seed(seed).shuffle().repeat()                         global order, reshuffled every epoch
    .random_map(TwoViewTransform)                          decode once, cut both views
    [process_index::process_count]                         this process's share
    .to_iter_dataset(ReadOptions(num_threads, prefetch))   threads decode/crop ahead
  -> SkipInvalidBatch(per_process_batch)                   drop + count corrupt, stack B examples

Decisions:
- Process sharding slices the *globally* shuffled, repeated stream with stride process_count,
  after random_map. Processes therefore read disjoint positions of one global stream, every
  epoch is shuffled across all data (not within a fixed per-host subset), and an example's
  views depend only on (seed, global position) -- not on how many processes there are.
- Corrupt records: the transform returns {'valid': False} instead of raising; SkipInvalidBatch
  drops them before stacking (so every batch is full and static-shaped) and counts them. The
  count lives in the iterator state, so it survives checkpoint/restore and a resumed run logs
  the same total. A stream with only invalid records raises after `max_consecutive_invalid`.
- Batching happens after the thread prefetch: grain's threads share the work example by
  example, and invalid records are dropped before anything is stacked.
"""
import dataclasses
import time
from typing import Any, Dict, Iterator, Optional, Sequence

from absl import logging
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from soda_jax.data import multiview, sources, views

BATCH_KEYS = ("source", "target", "target_box", "label", "index")
# 3-D views (sources.MULTIVIEW_NAMES): K source views with their rays, one target view.
MULTIVIEW_BATCH_KEYS = ("source", "source_rays", "target", "target_rays", "source_views",
                        "target_view", "index", "source_mask")


# --------------------------------------------------------------------------- transforms


def _attach_index(index: int, record: Dict[str, Any]) -> Dict[str, Any]:
  return dict(record, index=index)


@dataclasses.dataclass(frozen=True)
class TwoViewTransform(grain.transforms.RandomMap):
  """Decode once and cut (source, target); corrupt records become {'valid': False}."""
  view: views.ViewConfig
  channels: int

  def random_map(self, element: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    index = np.int32(element.get("index", -1))
    img = views.decode(element, self.channels)
    if img is None:
      return {"valid": False, "index": index}
    out = views.two_views(img, rng, self.view)
    out.update(label=np.int32(element["label"]), index=index, valid=True)
    return out


@dataclasses.dataclass(frozen=True)
class MultiViewTransform(grain.transforms.RandomMap):
  """Object index -> `multiview.sample_example` (K source views + a target view, with rays);
  an object that cannot be read (missing / corrupt file) becomes {'valid': False}."""
  src: Any
  num_source_views: int
  min_source_views: Optional[int] = None

  def random_map(self, element: int, rng: np.random.Generator) -> Dict[str, Any]:
    try:
      out = multiview.sample_example(self.src, int(element), rng, self.num_source_views,
                                     min_source_views=self.min_source_views)
    except (OSError, ValueError, KeyError) as e:  # missing/corrupt files, too few views
      logging.warning("Multi-view object %d of %r unreadable: %s", int(element), self.src, e)
      return {"valid": False, "index": np.int32(element)}
    out["valid"] = True
    return out


class SkipInvalidBatch(grain.IterDataset):
  """Drops records marked invalid (counting them) and stacks `batch_size` valid ones."""

  def __init__(self, parent: grain.IterDataset, batch_size: int,
               max_consecutive_invalid: int = 10_000, keys: Sequence[str] = BATCH_KEYS):
    super().__init__(parent)
    self._batch_size = batch_size
    self._max_invalid = max_consecutive_invalid
    self._keys = tuple(keys)

  def __iter__(self) -> "SkipInvalidBatchIterator":
    return SkipInvalidBatchIterator(self._parent.__iter__(), self._batch_size, self._max_invalid,
                                    self._keys)

  def __str__(self) -> str:
    return f"SkipInvalidBatch(batch_size={self._batch_size})"


class SkipInvalidBatchIterator(grain.DatasetIterator):
  """State = parent state + the number of records skipped so far (checkpointed with it)."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, max_invalid: int,
               keys: Sequence[str] = BATCH_KEYS):
    super().__init__(parent)
    self._batch_size = batch_size
    self._max_invalid = max_invalid
    self._keys = tuple(keys)
    self.skipped_records = 0

  def __next__(self) -> Dict[str, np.ndarray]:
    items, run = [], 0
    while len(items) < self._batch_size:
      x = next(self._parent)
      if x["valid"]:
        items.append(x)
        run = 0
        continue
      self.skipped_records += 1
      run += 1
      if self.skipped_records <= 10 or self.skipped_records % 1000 == 0:
        logging.warning("Skipped undecodable record (source index %d); %d skipped so far.",
                        int(x["index"]), self.skipped_records)
      if run >= self._max_invalid:
        raise RuntimeError(f"{run} consecutive records could not be decoded: is the dataset "
                           "(config.data.name / folder / tfds_data_dir) the right one?")
    return {k: np.stack([x[k] for x in items]) for k in self._keys}

  def get_state(self) -> Dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped_records": self.skipped_records}

  def set_state(self, state: Dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.skipped_records = int(state["skipped_records"])

  def __str__(self) -> str:
    return f"SkipInvalidBatchIterator(batch_size={self._batch_size})"


# --------------------------------------------------------------------------- train / eval


def resolve_num_threads(num_threads: int, src: Any) -> int:
  """config.data.num_threads, with -1 resolved by whether the source lives in memory."""
  if num_threads >= 0:
    return int(num_threads)
  src = getattr(src, "parent", src)  # a split slice of another source
  return 0 if isinstance(src, sources.IN_MEMORY_SOURCES) else 16


def make_train_dataset(config: ml_collections.ConfigDict, *, seed: int, process_index: int,
                       process_count: int) -> grain.IterDataset:
  """The training IterDataset of this process (see the module docstring for the stages)."""
  data = config.data
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  per_process_batch = config.batch_size // process_count
  src = sources.get_source(data, data.split)
  logging.info("Train source %r: %d records; process %d/%d takes every %d-th of the stream.",
               src, len(src), process_index, process_count, process_count)
  if sources.is_multiview(data):
    return _multiview_train_dataset(data, src, seed, process_index, process_count,
                                    per_process_batch)
  ds = grain.MapDataset.source(src).map_with_index(_attach_index)
  ds = ds.seed(int(seed)).shuffle().repeat()
  ds = ds.random_map(TwoViewTransform(views.ViewConfig.from_config(data), int(data.channels)))
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=resolve_num_threads(data.num_threads, src),
                           prefetch_buffer_size=int(data.prefetch) * per_process_batch)
  return SkipInvalidBatch(ds.to_iter_dataset(read), per_process_batch)


def _multiview_train_dataset(data, src, seed, process_index, process_count, per_process_batch):
  """Objects shuffled per epoch -> K source + 1 target view each (the same stages as 2-D).

  Synthetic objects are rendered in the reading thread (numpy) and cached per view, so threads
  help only while the cache fills; file readers decode PNGs (threads release the GIL).
  """
  ds = grain.MapDataset.range(len(src)).seed(int(seed)).shuffle().repeat()
  ds = ds.random_map(MultiViewTransform(src, int(data.num_source_views),
                                        int(data.min_source_views)))
  ds = ds[process_index::process_count]
  threads = data.num_threads if data.num_threads >= 0 else (
      0 if data.name == "synthetic_multiview" else 16)
  read = grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=int(data.prefetch) * per_process_batch)
  return SkipInvalidBatch(ds.to_iter_dataset(read), per_process_batch,
                          keys=MULTIVIEW_BATCH_KEYS)


def make_train_iterator(config: ml_collections.ConfigDict, *, seed: int,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> SkipInvalidBatchIterator:
  """Infinite iterator of this process's batches (dicts of numpy arrays):

  source, target (B, S, S, C) float32 in [-1, 1]; target_box (B, 4) float32; label (B,) int32;
  index (B,) int32 (position in the source split). Multi-view datasets instead give
  MULTIVIEW_BATCH_KEYS: source (B, K, S, S, 3), source_rays (B, K, S, S, 6), target (B, S, S, 3),
  target_rays (B, S, S, 6), source_views (B, K), target_view (B,), index (B,) (object),
  source_mask (B, K) bool (the views each example's latent averages).
  B = config.batch_size // process_count.
  Checkpointable: `get_state()` / `set_state()` (JSON-serialisable; grain.checkpoint works).
  """
  return iter(make_train_dataset(
      config, seed=seed,
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count))


def skipped_records(iterator: Any) -> int:
  """How many corrupt records the training iterator has dropped (survives restore)."""
  if not hasattr(iterator, "skipped_records"):
    raise TypeError(f"{iterator!r} is not an iterator from make_train_iterator")
  return int(iterator.skipped_records)


@dataclasses.dataclass(frozen=True)
class CenterViewTransform(grain.transforms.Map):
  """The deterministic evaluation view; corrupt records become {'valid': False}."""
  image_size: int
  channels: int

  def map(self, element: Dict[str, Any]) -> Dict[str, Any]:
    img = views.decode(element, self.channels)
    if img is None:
      return {"valid": False, "index": element["index"]}
    return {"valid": True, "index": element["index"], "label": element["label"],
            "image": views.center_view(img, self.image_size)}


def make_eval_arrays(config: ml_collections.ConfigDict, split: str,
                     num_examples: Optional[int] = None) -> Dict[str, np.ndarray]:
  """The first `num_examples` decodable records of `split` as centre views, no randomness.

  Returns image (N, S, S, C) float32 in [-1, 1], label (N,) int32, index (N,) int32 (source
  positions; corrupt records are skipped, so N is smaller than asked only if the split is).
  Decoding runs on grain threads for file-backed sources; the order is the source order.
  """
  data = config.data
  size, channels = int(data.image_size), int(data.channels)
  src = sources.get_source(data, split)
  n = len(src) if num_examples is None else min(int(num_examples), len(src))
  ds = grain.MapDataset.source(src).map_with_index(_attach_index)
  ds = ds.map(CenterViewTransform(size, channels))
  read = grain.ReadOptions(num_threads=resolve_num_threads(data.num_threads, src),
                           prefetch_buffer_size=256)
  images, labels, indices, seen = [], [], [], 0
  it = iter(ds.to_iter_dataset(read))
  try:
    while len(images) < n:
      x = next(it, None)
      if x is None:
        break
      seen += 1
      if x["valid"]:
        images.append(x["image"])
        labels.append(x["label"])
        indices.append(x["index"])
  finally:
    it.close()
  if seen > len(images):
    logging.warning("make_eval_arrays(%r): skipped %d undecodable records", split,
                    seen - len(images))
  return dict(image=np.stack(images) if images else np.zeros((0, size, size, channels),
                                                             np.float32),
              label=np.asarray(labels, np.int32), index=np.asarray(indices, np.int32))


# --------------------------------------------------------------------------- to devices


def batch_axes(mesh: jax.sharding.Mesh, data_axes: Sequence[str] = ("data", "fsdp")):
  """The mesh axes the batch dimension is split over (those of `data_axes` the mesh has)."""
  return tuple(a for a in data_axes if a in mesh.axis_names)


def to_global_batch(batch: Dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                    data_axes: Sequence[str] = ("data", "fsdp")) -> Dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays, batch dim split over `data_axes`.

  Every process passes its own (B_local, ...) arrays; the global batch is their concatenation
  in process order (B_local * process_count).
  """
  axes = batch_axes(mesh, data_axes)
  sharding = NamedSharding(mesh, P(axes))
  local_devices = len(mesh.local_devices)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim == 0 or v.shape[0] % local_devices:
      raise ValueError(
          f"to_global_batch: batch[{k!r}] has local batch size "
          f"{v.shape[0] if v.ndim else 'scalar'}, not divisible by the {local_devices} local "
          f"devices of mesh {dict(mesh.shape)}; use config.batch_size divisible by "
          "jax.device_count()")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def measure_throughput(iterator: Iterator[Any], num_batches: int) -> float:
  """Batches per second over `num_batches` calls of next() (warm the iterator up first)."""
  t0 = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches / (time.perf_counter() - t0)
