"""Learning-curve tool: paused/resumed runs, per-seed points, summary, plot, bad steps named."""
import json
import os

import numpy as np
import pytest

from soda_jax import config_base
from soda_jax.tools import learning_curve
from tests.test_config_checks import load_config


@pytest.mark.slow
def test_curve_points_resume_and_plot(tmp_path):
  c = config_base.override(load_config("tiny"), {"num_train_steps": 4, "evals.num_samples": 0,
                                                    "evals.z_usage_every_steps": 0})
  out = learning_curve.run(c, str(tmp_path), seeds=[0], eval_steps=[0, 4])
  pts = out["curves"]["0"]
  assert [p["step"] for p in pts] == [0, 4]
  # Step 0 is the seed's random init: zero latent projections, so z is not used at all.
  assert pts[0]["z_usage/gain_t0.9"] == 1.0
  assert all(0 <= p["probe_top1_h"] <= 1 and np.isfinite(p["recon_psnr"]) for p in pts)
  assert 0 <= out["raw_pixels"]["probe_top1"] <= 1
  assert os.path.getsize(tmp_path / "learning_curve.png") > 1000
  with open(tmp_path / "learning_curve.json") as f:
    assert json.load(f)["curves"]["0"] == pts
  # A second call finds every point done: nothing retrained, same numbers.
  again = learning_curve.run(c, str(tmp_path), seeds=[0], eval_steps=[0, 4])
  assert again["curves"]["0"] == pts
  with pytest.raises(ValueError, match="another config"):
    learning_curve.run(config_base.override(c, {"seed": 5}), str(tmp_path), [0], [0])


def test_summary_mean_std_and_bad_steps():
  res = {"curves": {"0": [{"step": 0, "probe_top1_h": 0.5}, {"step": 10, "probe_top1_h": 0.6}],
                    "1": [{"step": 0, "probe_top1_h": 0.7}]},
         "raw_pixels": {"probe_top1": 0.8, "knn_top1": 0.7}}
  s = learning_curve.summarize(res)
  assert [r["step"] for r in s] == [0, 10] and [r["num_seeds"] for r in s] == [2, 1]
  np.testing.assert_allclose([s[0]["probe_top1_h"], s[0]["probe_top1_h_std"]],
                             [0.6, np.std([0.5, 0.7], ddof=1)])
  assert s[1]["probe_top1_h_std"] == 0.0
  res["summary"] = s
  assert "| 0 | 2 | 60.00 +- 14.14 |" in learning_curve.format_table(res)
  with pytest.raises(ValueError, match=r"--eval_steps \[30\] outside \[0, num_train_steps=20\]"):
    learning_curve.run(load_config("tiny"), "/tmp/unused", [0], [0, 30])


def test_a_preempted_run_keeps_its_points_and_says_how_to_resume(tmp_path, monkeypatch):
  """SIGTERM during seed 1's training (train_and_evaluate returns preempted): seed 0's point is
  kept and summarised, nothing is recorded for seed 1, the table prints (it raised KeyError
  before), and the result says where it stopped; the json holds no 'stopped' key."""
  from soda_jax import train  # pylint: disable=g-import-not-at-top
  from soda_jax.evaluate import representation  # pylint: disable=g-import-not-at-top
  c = config_base.override(load_config("tiny"), {"num_train_steps": 4})

  def fake_train(cfg, workdir, stop_after):
    if cfg.seed == 1:
      return {"preempted": True, "step": 2, "state": None, "z_usage": []}
    return {"preempted": False, "step": stop_after, "state": None, "z_usage": []}

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  monkeypatch.setattr(representation, "evaluate",
                      lambda *a, **k: dict.fromkeys(learning_curve.METRICS, 0.5))
  out = learning_curve.run(c, str(tmp_path), seeds=[0, 1], eval_steps=[4])
  assert out["stopped"] == {"seed": 1, "step": 2, "eval_step": 4}
  assert [p["step"] for p in out["curves"]["0"]] == [4] and out["curves"]["1"] == []
  assert [(r["step"], r["num_seeds"]) for r in out["summary"]] == [(4, 1)]
  assert "| 4 | 1 | 50.00 +- 0.00 |" in learning_curve.format_table(out)
  with open(tmp_path / "learning_curve.json") as f:
    saved = json.load(f)
  assert "stopped" not in saved and saved["curves"] == out["curves"]
