"""Sources: Fashion-MNIST IDX reader vs the raw files, folders, synthetic, tfds, dispatch."""
import gzip
import os

import numpy as np
from PIL import Image
import pytest

from soda_jax import config_base
from soda_jax.data import sources, views

IDX = sources.DEFAULT_IDX_ROOT
HAVE_IDX = os.path.exists(os.path.join(IDX, "train-images-idx3-ubyte.gz"))
needs_idx = pytest.mark.skipif(not HAVE_IDX, reason="apt-get install -y dataset-fashion-mnist")


def data_config(**kw):
  d = config_base.data_config()
  d.update(kw)
  return d


@pytest.fixture(scope="module")
def fmnist_train():
  return sources.FashionMnistIdx("train")


@needs_idx
def test_fashion_mnist_idx_against_raw_file(fmnist_train):
  src = fmnist_train
  assert len(src) == 60_000 and src.images.shape == (60_000, 28, 28, 1)
  assert src.images.dtype == np.uint8 and src.labels.dtype == np.int32
  assert np.bincount(src.labels).tolist() == [6000] * 10  # balanced classes, labels 0..9
  # Independently: IDX images have a 16-byte header, labels an 8-byte one.
  with gzip.open(os.path.join(IDX, "train-images-idx3-ubyte.gz"), "rb") as f:
    head = f.read(16 + 784)
  with gzip.open(os.path.join(IDX, "train-labels-idx1-ubyte.gz"), "rb") as f:
    lhead = f.read(9)
  assert int.from_bytes(head[4:8], "big") == 60_000
  first = np.frombuffer(head[16:], np.uint8)
  rec = src[0]
  assert rec["label"] == lhead[8] == 9  # the first training image is an ankle boot
  assert rec["image"].shape == (28, 28, 1)
  assert int(rec["image"].sum()) == int(first.astype(np.int64).sum())
  np.testing.assert_array_equal(rec["image"].ravel(), first)
  test = sources.FashionMnistIdx("test")
  assert len(test) == 10_000 and test.labels.min() == 0 and test.labels.max() == 9


@needs_idx
def test_fashion_mnist_split_slices(fmnist_train):
  head = sources.FashionMnistIdx("train[:100]")
  assert len(head) == 100 and head[0]["label"] == fmnist_train[0]["label"]
  tail = sources.FashionMnistIdx("train[90%:]")
  assert len(tail) == 6000
  np.testing.assert_array_equal(tail[0]["image"], fmnist_train[54_000]["image"])


def test_parse_split():
  assert sources.parse_split("train") == ("train", slice(None, None))
  assert sources.parse_split("test[10%:-5]") == ("test", slice("10%", "-5"))
  assert list(sources.slice_range(10, sources.parse_split("x[20%:-2]")[1])) == [2, 3, 4, 5, 6, 7]
  with pytest.raises(ValueError, match="split="):
    sources.parse_split("train[::2]")


def test_synthetic_is_deterministic_and_labelled():
  a, b = sources.SyntheticShapes(50, 24, seed=3), sources.SyntheticShapes(50, 24, seed=3)
  r = a[7]
  assert r["image"].shape == (24, 24, 3) and r["image"].dtype == np.uint8
  np.testing.assert_array_equal(r["image"], b[7]["image"])
  assert not np.array_equal(r["image"], sources.SyntheticShapes(50, 24, seed=4)[7]["image"])
  labels = [a[i]["label"] for i in range(50)]
  assert set(labels) == set(range(len(sources.SHAPES)))
  with pytest.raises(IndexError):
    a[50]


def write_folder(root, corrupt=True):
  """root/{cat,ant}/...: 4 real PNGs (+ one garbage .png in 'cat'); sorted classes ant=0, cat=1."""
  rng = np.random.default_rng(0)
  for cls, names in (("cat", ["c0.png", "c1.jpg"]), ("ant", ["a0.png", "a1.PNG"])):
    os.makedirs(root / cls, exist_ok=True)
    for name in names:
      img = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
      img.save(root / cls / name, format="JPEG" if name.endswith("jpg") else "PNG")
  if corrupt:
    (root / "cat" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
  (root / "cat" / "notes.txt").write_text("ignored")


def test_image_folder(tmp_path):
  write_folder(tmp_path)
  src = sources.ImageFolder(str(tmp_path))
  assert src.classes == ["ant", "cat"] and len(src) == 5
  assert [src[i]["label"] for i in range(5)] == [0, 0, 1, 1, 1]
  assert isinstance(src[0]["image"], bytes)
  decoded = [views.decode(src[i]) for i in range(5)]
  assert [d is None for d in decoded] == [False] * 4 + [True]  # zz_bad.png sorts last
  assert decoded[0].shape == (12, 10, 3)
  with pytest.raises(FileNotFoundError):
    sources.ImageFolder(str(tmp_path / "nowhere"))


def test_get_source_dispatch(tmp_path):
  syn = sources.get_source(data_config(name="synthetic", synthetic_examples=40), "train")
  assert len(syn) == 40
  syn_test = sources.get_source(data_config(name="synthetic", synthetic_examples=40), "test[:5]")
  assert len(syn_test) == 5 and not np.array_equal(syn_test[0]["image"], syn[0]["image"])
  write_folder(tmp_path / "train")
  folder = sources.get_source(data_config(name="folder", folder=str(tmp_path)), "train")
  assert isinstance(folder, sources.ImageFolder) and len(folder) == 5
  with pytest.raises(ValueError, match="config.data.name='no_such_dataset_xyz'"):
    sources.get_source(data_config(name="no_such_dataset_xyz"), "train")


def test_fashion_mnist_missing_names_paths_and_fixes(tmp_path):
  d = data_config(name="fashion_mnist", idx_root=str(tmp_path), tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    sources.get_source(d, "train")
  msg = str(e.value)
  assert os.path.join(str(tmp_path), "train-images-idx3-ubyte.gz") in msg
  assert "apt-get install -y dataset-fashion-mnist" in msg and "tfds build fashion_mnist" in msg


def test_config_errors():
  assert sources.config_errors(data_config()) == []
  assert sources.config_errors(data_config(name="cifar10")) == []  # a registered tfds name
  errs = sources.config_errors(data_config(name="bogus_xyz", crop_scale=(0.5, 0.2), channels=2))
  assert any("config.data.name='bogus_xyz'" in e for e in errs)
  assert any("config.data.crop_scale=(0.5, 0.2)" in e for e in errs)
  assert any("config.data.channels=2" in e for e in errs)


def test_tfds_mock_data_source():
  """tfds.testing.mock_data works offline with tfds.data_source: images arrive as PNG bytes."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    src = sources.tfds_source("mnist", "train", data_dir=None)
    assert len(src) == 12
    rec = src[0]
    assert isinstance(rec["image"], bytes) and 0 <= rec["label"] < 10
    assert views.decode(rec).shape == (28, 28, 1)
    # And through the dispatcher: 'tfds:<name>' and a bare tfds name. (The mock ignores split
    # slices: it always yields num_examples records.)
    assert len(sources.get_source(data_config(name="tfds:mnist"), "test")) == 12
    assert isinstance(sources.get_source(data_config(name="mnist"), "train"), sources.TfdsSource)
