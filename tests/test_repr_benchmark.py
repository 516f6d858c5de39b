"""The representation benchmark's bookkeeping on the tiny config: rows add up across runs."""
import json

import pytest

from soda_jax import config_base
from soda_jax.tools import repr_benchmark
from tests.test_config_checks import load_config


def test_rows_from_separate_runs_merge_into_one_json(tmp_path):
  config = load_config("tiny")
  first = repr_benchmark.run(config, str(tmp_path), rows=("raw_pixels",))
  assert set(first) == {"raw_pixels"}
  second = repr_benchmark.run(config, str(tmp_path), rows=("random_encoder",))
  assert list(second) == ["raw_pixels", "random_encoder"]  # table order, earlier row kept
  with open(tmp_path / "repr_benchmark.json") as f:
    saved = json.load(f)
  assert saved["raw_pixels"] == first["raw_pixels"]
  for key in ("probe_top1_h", "probe_top1_z", "knn_top1_h", "knn_top1_z"):
    assert 0.0 <= saved["random_encoder"][key] <= 1.0
  table = repr_benchmark.format_table(second)
  assert "| raw pixels |" in table and "| random_encoder |" in table


def test_unknown_row_is_named():
  with pytest.raises(ValueError, match=r"--rows has unknown entries \['sodaa'\]"):
    repr_benchmark.run(load_config("tiny"), "/tmp/unused", rows=("sodaa",))


def test_supervised_reference_row_trains_the_encoder(tmp_path, optimized_kernels):  # pylint: disable=unused-argument
  config = config_base.override(load_config("tiny"), {"num_train_steps": 150})  # batch 16
  row = repr_benchmark.run(config, str(tmp_path), rows=("supervised",))["supervised"]
  assert row["train_examples"] == min(16 * 150, config.data.synthetic_examples)
  assert row["train_loss_last"] < 0.8 * row["train_loss_first"], row
  assert 0.0 <= row["probe_top1_h"] <= 1.0 and 0.0 <= row["knn_top1_h"] <= 1.0
  assert "| supervised |" in repr_benchmark.format_table({"supervised": row})
