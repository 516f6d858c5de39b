"""grain pipeline: batch format, determinism, process sharding, state restore, corrupt records,
eval arrays, tfds mock end to end, and global jax.Arrays on the fake 8-device mesh."""
import json

import grain
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from soda_jax import config_base
from soda_jax.data import pipeline, sources, views
from tests.test_data_sources import HAVE_IDX, write_folder


def make_config(batch_size=8, **data):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = batch_size
  c.data = config_base.data_config()
  c.data.update(dict(name="synthetic", synthetic_examples=64, image_size=16, channels=3,
                     num_threads=2, prefetch=2))
  c.data.update(data)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format():
  c = make_config(channels=1, color_jitter=0.4)
  b = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
  assert set(b) == {"source", "target", "target_box", "label", "index"}
  assert b["source"].shape == b["target"].shape == (8, 16, 16, 1)
  assert b["source"].dtype == b["target"].dtype == np.float32
  assert b["target_box"].shape == (8, 4) and b["target_box"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
  assert -1 <= b["source"].min() and b["source"].max() <= 1
  assert not np.array_equal(b["source"], b["target"])  # two different crops
  src = sources.SyntheticShapes(64, 16, sources._synthetic_seed("train"))
  assert b["label"].tolist() == [src[i]["label"] for i in b["index"]]


def test_same_view_batches():
  b = next(pipeline.make_train_iterator(make_config(same_view=True), seed=0, process_index=0,
                                        process_count=1))
  np.testing.assert_array_equal(b["source"], b["target"])
  np.testing.assert_array_equal(b["target_box"], np.tile([0, 0, 1, 1], (8, 1)))


def test_deterministic_given_seed_and_epochs_differ():
  c = make_config()
  a = take(pipeline.make_train_iterator(c, seed=5, process_index=0, process_count=1), 10)
  b = take(pipeline.make_train_iterator(c, seed=5, process_index=0, process_count=1), 10)
  assert_batches_equal(a, b)
  other = next(pipeline.make_train_iterator(c, seed=6, process_index=0, process_count=1))
  assert not np.array_equal(a[0]["index"], other["index"])
  # 64 examples = 8 batches per epoch: each epoch is a permutation, reshuffled, with new views.
  epoch0 = np.concatenate([x["index"] for x in a[:8]])
  assert sorted(epoch0.tolist()) == list(range(64))
  first_of_1 = np.concatenate([x["index"] for x in a[8:10]])
  assert not np.array_equal(first_of_1, epoch0[:16])


def test_processes_read_disjoint_parts_of_one_global_stream():
  # Global batch 16: 2 processes x 8, or 1 process x 16. Positions interleave with stride 2.
  c = make_config(batch_size=16)
  p0 = take(pipeline.make_train_iterator(c, seed=1, process_index=0, process_count=2), 2)
  p1 = take(pipeline.make_train_iterator(c, seed=1, process_index=1, process_count=2), 2)
  idx0 = np.concatenate([b["index"] for b in p0])
  idx1 = np.concatenate([b["index"] for b in p1])
  assert len(idx0) == len(idx1) == 16
  assert not set(idx0.tolist()) & set(idx1.tolist())  # disjoint (within the first epoch)
  single = take(pipeline.make_train_iterator(c, seed=1, process_index=0, process_count=1), 2)
  glob = {k: np.concatenate([b[k] for b in single]) for k in single[0]}
  np.testing.assert_array_equal(glob["index"][0::2], idx0)
  np.testing.assert_array_equal(glob["index"][1::2], idx1)
  # Same global position -> same views, whatever the process count.
  np.testing.assert_array_equal(glob["source"][1::2][:8], p1[0]["source"])
  np.testing.assert_array_equal(glob["target_box"][0::2][:8], p0[0]["target_box"])
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.make_train_iterator(c, seed=1, process_index=0, process_count=3)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_state_restore_is_bitwise(num_threads):
  c = make_config(num_threads=num_threads, color_jitter=0.3)
  it = pipeline.make_train_iterator(c, seed=3, process_index=0, process_count=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip (Orbax)
  expected = take(it, 4)
  fresh = pipeline.make_train_iterator(c, seed=3, process_index=0, process_count=1)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)


def test_grain_checkpoint_handler_round_trip(tmp_path):
  """The state also round-trips through grain's own checkpoint handler (what Orbax calls)."""
  c = make_config()
  it = pipeline.make_train_iterator(c, seed=2, process_index=0, process_count=1)
  take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "ckpt").mkdir()
  handler.save(tmp_path / "ckpt", args=grain.checkpoint.CheckpointSave(it))
  expected = take(it, 2)
  fresh = pipeline.make_train_iterator(c, seed=2, process_index=0, process_count=1)
  handler.restore(tmp_path / "ckpt", args=grain.checkpoint.CheckpointRestore(fresh))
  assert_batches_equal(take(fresh, 2), expected)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
  write_folder(tmp_path)  # 4 good images + zz_bad.png (source index 4)
  c = make_config(batch_size=4, name="folder", folder=str(tmp_path), image_size=8)
  it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
  assert pipeline.skipped_records(it) == 0
  batches = take(it, 3)  # 12 valid = 3 epochs of 4 good, 1 bad per epoch
  for b in batches:
    assert b["source"].shape == (4, 8, 8, 3) and 4 not in b["index"].tolist()
  skipped = pipeline.skipped_records(it)
  assert skipped in (2, 3)  # one bad per epoch; the third may lie after the 12th good one
  state = it.get_state()
  assert state["skipped_records"] == skipped
  assert state["parent"]["next_index"] == 12 + skipped  # records consumed = valid + skipped
  fresh = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
  fresh.set_state(state)
  assert pipeline.skipped_records(fresh) == skipped  # the counter survives a restore
  ev = pipeline.make_eval_arrays(c, "train", None)
  assert ev["image"].shape == (4, 8, 8, 3) and ev["index"].tolist() == [0, 1, 2, 3]
  assert ev["label"].tolist() == [0, 0, 1, 1]


def test_all_invalid_stream_raises():
  ds = grain.MapDataset.range(100).map(lambda i: {"valid": False, "index": i}).to_iter_dataset()
  it = iter(pipeline.SkipInvalidBatch(ds, 4, max_consecutive_invalid=20))
  with pytest.raises(RuntimeError, match="20 consecutive records"):
    next(it)


@pytest.mark.skipif(not HAVE_IDX, reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_train_and_eval_arrays():
  c = make_config(batch_size=16, name="fashion_mnist", channels=1, image_size=32)
  b = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
  assert b["source"].shape == (16, 32, 32, 1) and b["label"].max() < 10
  ev = pipeline.make_eval_arrays(c, "test", 8)
  again = pipeline.make_eval_arrays(c, "test", 8)
  np.testing.assert_array_equal(ev["image"], again["image"])
  raw = sources.FashionMnistIdx("test[:8]")
  assert ev["label"].tolist() == raw.labels.tolist()
  np.testing.assert_array_equal(ev["image"][3], views.center_view(raw[3]["image"], 32))
  # Resizing 28 -> 32 keeps the mean brightness to within a grey level.
  mean_pixels = (ev["image"].mean(axis=(1, 2, 3)) + 1) * 255 / 2
  np.testing.assert_allclose(mean_pixels, raw.images.reshape(8, -1).mean(1), atol=1.0)


def test_tfds_mock_end_to_end():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    c = make_config(batch_size=8, name="tfds:mnist", channels=1)
    it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
    b = take(it, 3)[-1]
    assert b["source"].shape == (8, 16, 16, 1) and pipeline.skipped_records(it) == 0
    ev = pipeline.make_eval_arrays(c, "test", 5)
    assert ev["image"].shape == (5, 16, 16, 1)


def test_to_global_batch_on_2x4_mesh():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  b = next(pipeline.make_train_iterator(make_config(batch_size=16), seed=0, process_index=0,
                                        process_count=1))
  g = pipeline.to_global_batch(b, mesh)
  assert g["source"].shape == (16, 16, 16, 3) and g["target_box"].shape == (16, 4)
  for k, v in g.items():
    assert v.sharding.spec == P(("data", "fsdp")), k
    assert v.sharding.mesh.shape == mesh.shape
    assert {s.data.shape[0] for s in v.addressable_shards} == {2}  # 16 / 8 devices
    np.testing.assert_array_equal(np.asarray(v), b[k])
  bad = {k: v[:12] for k, v in b.items()}
  with pytest.raises(ValueError, match="not divisible by the 8 local devices"):
    pipeline.to_global_batch(bad, mesh)


def test_measure_throughput():
  it = pipeline.make_train_iterator(make_config(), seed=0, process_index=0, process_count=1)
  next(it)
  assert pipeline.measure_throughput(it, 3) > 0


def test_transforms_and_sources_pickle(tmp_path):
  """Picklable, so the same pipeline can move to grain worker processes (mp_prefetch)."""
  import pickle  # pylint: disable=g-import-not-at-top
  write_folder(tmp_path)
  c = make_config()
  t = pipeline.TwoViewTransform(views.ViewConfig.from_config(c.data), 3)
  for obj in (t, sources.SyntheticShapes(8, 8), sources.ImageFolder(str(tmp_path))):
    assert pickle.loads(pickle.dumps(obj)) is not None
  rec = dict(sources.SyntheticShapes(8, 8)[0], index=0)
  a = pickle.loads(pickle.dumps(t)).random_map(rec, np.random.default_rng(0))
  np.testing.assert_array_equal(a["source"], t.random_map(rec, np.random.default_rng(0))["source"])
