"""Multi-view data through grain: batch format of 'synthetic_multiview' and 'nmr', rays that
match the cameras, determinism; and up-front checks of 3-D configs."""
import ml_collections
import numpy as np
import pytest

from soda_jax import config_base, config_checks
from soda_jax.data import cameras, pipeline, sources
from tests.test_config_checks import load_config
from tests.test_multiview_readers import nmr_root  # noqa: F401  (a fixture)


def make_config(batch_size=4, **data):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = batch_size
  c.data = config_base.data_config()
  c.data.update(dict(name="synthetic_multiview", synthetic_examples=6, image_size=16,
                     channels=3, num_source_views=2, num_threads=0, prefetch=1))
  c.data.update(data)
  return c


def test_synthetic_multiview_batches():
  c = make_config()
  it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
  b = next(it)
  assert set(b) == set(pipeline.MULTIVIEW_BATCH_KEYS)
  assert b["source"].shape == (4, 2, 16, 16, 3) and b["source_rays"].shape == (4, 2, 16, 16, 6)
  assert b["target"].shape == (4, 16, 16, 3) and b["target_rays"].shape == (4, 16, 16, 6)
  assert b["source"].dtype == np.float32 and -1 <= b["source"].min() and b["source"].max() <= 1
  # min_source_views=1 (the default): each example counts its first k of the K views.
  assert b["source_mask"].shape == (4, 2) and b["source_mask"].dtype == bool
  assert b["source_mask"][:, 0].all()
  # Views are distinct per example, and the rays are those of the chosen ring cameras.
  for sv, tv in zip(b["source_views"], b["target_view"]):
    assert len({*sv.tolist(), int(tv)}) == 3
  src = sources.get_source(c.data, "train")
  assert len(src) == 6 and src.split == "train"
  w2c, k = src.cameras(0)
  i = 1
  np.testing.assert_allclose(b["target_rays"][i], cameras.ray_map(
      w2c[b["target_view"][i]], k[b["target_view"][i]], 16, 16), atol=1e-6)
  np.testing.assert_allclose(b["source_rays"][i, 1], cameras.ray_map(
      w2c[b["source_views"][i, 1]], k[b["source_views"][i, 1]], 16, 16), atol=1e-6)
  # The same seed gives the same stream; the eval split holds other (test) objects.
  again = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
  for key in b:
    np.testing.assert_array_equal(b[key], again[key], err_msg=key)
  test_src = sources.get_source(c.data, "test")
  assert len(test_src) == 1 and test_src.object_ids[0] >= 1_000_000


def test_nmr_folder_batches(nmr_root):  # noqa: F811
  c = make_config(batch_size=2, name="nmr", folder=str(nmr_root), image_size=32,
                  num_source_views=1)
  b = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
  assert b["source"].shape == (2, 1, 32, 32, 3) and b["target_rays"].shape == (2, 32, 32, 6)
  assert sorted(b["index"].tolist()) == [0, 1]  # one epoch of two objects
  # Plucker rays: unit directions, moments orthogonal to them.
  d, m = b["target_rays"][..., :3], b["target_rays"][..., 3:]
  np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.sum(d * m, axis=-1), 0.0, atol=1e-5)


def _nvs_tiny():
  return load_config("nvs_synthetic", "variant=tiny")


@pytest.mark.parametrize("overrides,message", [
    ({"model.pose": "none"}, "config.model.pose='none' must be 'rays' for the multi-view "
                             "dataset config.data.name='synthetic_multiview'"),
    ({"model.pose": "box"}, "config.model.pose='box' must be 'rays'"),
    ({"data.name": "synthetic", "data.channels": 1},
     "config.model.pose='rays' needs a multi-view dataset"),
    ({"data.num_source_views": 0}, "config.data.num_source_views=0 must be an int in [1, 8]"),
    ({"data.min_source_views": 3},
     "config.data.min_source_views=3 must be an int in [1, num_source_views=2]"),
    ({"data.min_source_views": 0}, "config.data.min_source_views=0 must be an int in [1, "),
    ({"data.channels": 1}, "config.data.channels=1 must be 3 for the multi-view dataset"),
    ({"data.name": "nmr"}, "config.data.folder='' must be set when config.data.name='nmr'"),
    ({"data.split": "train[:10]"}, "config.data.split='train[:10]': multi-view datasets take"),
    ({"evals.num_samples": 8}, "config.evals.num_samples=8 must be 0 for the multi-view"),
    ({"evals.probe_every_steps": 0}, "config.evals.probe_every_steps=0 must be -1"),
    ({"evals.nvs_source_views": (1, 9)}, "config.evals.nvs_source_views=(1, 9) must be"),
    ({"evals.nvs_seed": -1}, "config.evals.nvs_seed=-1 must be an int >= 0"),
    ({"model.ray_freqs": -1}, "config.model.ray_freqs=-1 must be an int in [0, 16]"),
])
def test_bad_multiview_config_names_key_and_value(overrides, message):
  c = config_base.override(_nvs_tiny(), overrides)
  with pytest.raises(ValueError) as e:
    config_checks.check(c, num_devices=8)
  assert message in str(e.value)
