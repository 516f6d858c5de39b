"""NVS evaluation: the nearest-view baseline by hand, the tiny evaluation's JSON (keys, finite,
reproducible), and the end-to-end run of a tiny multi-view config."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from soda_jax import compile_once, config_base, sharding, train, train_step as ts
from soda_jax.data import cameras, multiview, sources
from soda_jax.evaluate import metrics, nvs
from soda_jax.models import soda
from tests import traces
from tests.random_params import perturbed
from tests.test_config_checks import ROOT, load_config


def test_nearest_view_baseline_by_hand():
  # Two objects, three constant source views each; the target of object 0 is 0.1 off source 2.
  source = np.zeros((2, 3, 4, 4, 3), np.float32)
  for j, v in enumerate((-0.5, 0.0, 0.5)):
    source[:, j] = v
  centres = np.array([[[0, 0, 2], [2, 0, 0], [0, 2, 0]],
                      [[0, 0, 2], [2, 0, 0], [0, 2, 0]]], np.float32)
  target_centre = np.array([[0.1, 1.9, 0.0], [1.5, 0.0, 0.5]], np.float32)
  images, idx = nvs.nearest_view(source, centres, target_centre)
  assert idx.tolist() == [2, 1]
  target = np.stack([np.full((4, 4, 3), 0.6), np.full((4, 4, 3), -0.2)]).astype(np.float32)
  # By hand: |0.5 - 0.6| = 0.1 -> 10 log10(2^2 / 0.01) = 26.02 dB; |0 + 0.2| -> 20.00 dB.
  expected = [10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.04)]
  np.testing.assert_allclose(metrics.psnr(images, target, 2.0), expected, rtol=1e-5)
  np.testing.assert_allclose(nvs.scores(images, target)["psnr"], np.mean(expected), rtol=1e-5)
  np.testing.assert_allclose(expected, [26.0206, 20.0], atol=1e-4)


def _tiny_model_and_variables(config):
  model = ts.build_model(config)
  inputs = soda.init_inputs(1, config.data.image_size, 3, model.num_subvectors)
  variables = nn.meta.unbox(compile_once.init(model, jax.random.PRNGKey(0), **inputs))
  # Noise on the zero-initialised layers, so the samples depend on z and the camera.
  return model, {**variables, "params": perturbed(variables["params"], seed=1, scale=0.05)}


def test_nvs_evaluate_tiny(tmp_path):
  config = load_config("nvs_synthetic", "variant=tiny")
  model, variables = _tiny_model_and_variables(config)
  with traces.traced_functions() as traced:
    out = nvs.evaluate(config, model, variables, str(tmp_path), step=7)
  # 1 and 3 views, no z and the turntable: one encoder and one DDIM step program for every
  # step of every call (w_z = 1; none if an earlier test of this process built them).
  assert traced.count("_encode") <= 1 and traced.count("_step") <= 1, traced
  with open(tmp_path / "nvs_eval.json") as f:
    saved = json.load(f)
  assert saved == out
  assert set(out) == {"step", "dataset", "split", "num_objects", "image_size", "sample_steps",
                      "w_z", "w_p", "source_views", "seed", "results"}
  assert out["step"] == 7 and out["num_objects"] == 4 and out["source_views"] == [1, 3]
  assert set(out["results"]) == {"k1", "k3"}
  for row in out["results"].values():
    assert set(row) == set(nvs.METHODS)
    for s in row.values():
      assert set(s) == {"psnr", "ssim"} and all(np.isfinite(v) for v in s.values())
  # The nearest-view numbers are those of the held-out draw, recomputed here.
  from soda_jax.data import sources  # pylint: disable=g-import-not-at-top
  ex = nvs.heldout_examples(sources.get_source(config.data, "test"), 4, 3,
                            seed=config.evals.nvs_seed)
  near, _ = nvs.nearest_view(ex["source"], ex["source_centres"], ex["target_centre"])
  np.testing.assert_allclose(out["results"]["k3"]["nearest_view"]["psnr"],
                             float(np.mean(metrics.psnr(near, ex["target"], 2.0))), rtol=1e-6)
  np.testing.assert_allclose(out["results"]["k1"]["nearest_view"]["psnr"],
                             float(np.mean(metrics.psnr(ex["source"][:, 0], ex["target"], 2.0))),
                             rtol=1e-6)
  # Reproducible, and a function of the checkpoint alone: another training seed is scored on
  # the same views with the same noise (evals.nvs_seed); another nvs_seed draws other views.
  again = nvs.evaluate(config_base.override(config, {"seed": 7}), model, variables,
                       str(tmp_path / "again"), step=7)
  assert again == out
  other = nvs.heldout_examples(sources.get_source(config.data, "test"), 4, 3, seed=config.evals.nvs_seed + 1)
  assert not np.array_equal(other["target"], ex["target"])
  png = tmp_path / "samples" / "nvs_turntable_0000007.png"
  assert png.exists()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # 2 objects x (3 sources + 2 cameras x (true, sample)) of 16 px with 1 px padding.
  assert Image.open(png).size == (7 * 17 + 1, 2 * 17 + 1)


@pytest.mark.slow
def test_multiview_train_and_nvs_eval_end_to_end(tmp_path):
  config = load_config("nvs_synthetic", "variant=tiny")
  out = train.train_and_evaluate(config, str(tmp_path))
  assert int(out["state"].step) == 2
  assert all(np.isfinite(s["loss"]) for _, s in out["history"])
  with open(os.path.join(tmp_path, "nvs_eval.json")) as f:
    saved = json.load(f)
  assert saved["step"] == 2 and set(saved["results"]) == {"k1", "k3"}
  assert out["nvs"] == saved
  # z usage on held-out objects at the end: the decoder's x0-error with the true, shuffled and
  # dropped latent of K posed source views.
  (z_step, z_scalars), = out["z_usage"]
  assert z_step == 2 and all(np.isfinite(v) and v > 0 for v in z_scalars.values())
  assert {"z_usage/true_t0.9", "z_usage/shuffled_t0.9", "z_usage/gain_t0.9"} <= set(z_scalars)
  # Re-evaluated from the checkpoint with another sampler setting, into its own directory.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, "-m", "soda_jax.evaluate",
                      "--config=configs/nvs_synthetic.py:variant=tiny", f"--workdir={tmp_path}",
                      "--config.diffusion.w_p=2.0", f"--out={tmp_path / 'ev'}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Novel views after 2 steps" in p.stdout
  with open(tmp_path / "ev" / "nvs_eval.json") as f:
    again = json.load(f)
  assert again["step"] == 2 and again["w_p"] == 2.0 and saved["w_p"] == 1.0
  # Same checkpoint, views and noise: the copy baseline is identical, the samples are not.
  assert again["results"]["k1"]["nearest_view"] == saved["results"]["k1"]["nearest_view"]
  assert again["results"]["k1"]["soda"] != saved["results"]["k1"]["soda"]


def test_rows_score_each_method_against_the_same_targets(tmp_path, monkeypatch):
  """With the sampler replaced by 'return source view 0' (and 'return zeros' without z),
  SODA's 1-view row must equal the nearest-view copy's (its only source view) and the
  unconditional row must be the zeros' score against the true targets: every row is scored on
  the same objects, targets and order. No model is run."""
  config = load_config("nvs_synthetic", "variant=tiny")

  def fake_sample_views(model, variables, source, source_rays, target_rays, rng, dcfg, mesh,
                        use_latent=True, **_):
    assert mesh is not None and mesh.size == jax.device_count()
    source = np.asarray(source)
    assert source.shape[0] == np.asarray(target_rays).shape[0]
    return source[:, 0] if use_latent else np.zeros_like(source[:, 0])

  monkeypatch.setattr(nvs, "sample_views", fake_sample_views)
  out = nvs.evaluate(config, None, None, str(tmp_path), step=1)
  r = out["results"]
  assert r["k1"]["soda"] == r["k1"]["nearest_view"]
  src = sources.get_source(config.data, config.data.eval_split)
  ex = nvs.heldout_examples(src, config.evals.nvs_objects, 3, seed=config.evals.nvs_seed)
  zeros = nvs.scores(np.zeros_like(ex["target"]), ex["target"])
  for k in ("k1", "k3"):
    assert r[k]["unconditional"] == zeros
  # With 3 views the copy picks the nearest of three, at least as close as view 0 alone.
  assert r["k3"]["nearest_view"]["psnr"] >= r["k1"]["nearest_view"]["psnr"]


def test_heldout_objects_spread_over_the_split():
  assert nvs.heldout_objects(4, 10).tolist() == [0, 2, 5, 7]
  assert nvs.heldout_objects(32, 10).tolist() == list(range(10))
  assert nvs.heldout_objects(0, 10).tolist() == []
  src = multiview.SyntheticMultiView("test", num_objects=40, image_size=8, supersample=1)
  assert len(src) == 40
  ex = nvs.heldout_examples(src, 3, 1, seed=0)
  assert ex["index"].tolist() == [0, 13, 26]


def test_turntable_cameras_circle_one_ring():
  src = multiview.SyntheticMultiView("test", num_objects=4, image_size=8, supersample=1)
  views = nvs.turntable_views(src, 0, 6)
  assert views.tolist() == [0, 4, 8, 12, 16, 20]
  centres = cameras.camera_centers(src.cameras(0)[0])[views]
  np.testing.assert_allclose(centres[:, 1], centres[0, 1], atol=1e-5)  # one height (+y up)
  azimuths = np.degrees(np.arctan2(centres[:, 0], centres[:, 2])) % 360
  np.testing.assert_allclose(np.diff(azimuths), 60.0, atol=1e-3)  # evenly round the object

  class OneRing:  # a source without rings (e.g. NMR: 24 views, one ring)
    def num_views(self, i):
      return 24

  assert nvs.turntable_views(OneRing(), 0, 4).tolist() == [0, 6, 12, 18]


def test_sample_views_in_chunks_over_the_mesh(monkeypatch):
  """Examples are sampled CHUNK at a time, each chunk split over the devices (padded to a
  multiple of them) and gathered to host numpy: 12 examples with CHUNK = 8 on 8 devices are
  two calls of 8 rows, the first the same as sampling those 8 alone."""
  config = load_config("nvs_synthetic", "variant=tiny")
  model, variables = _tiny_model_and_variables(config)
  src = sources.get_source(config.data, config.data.eval_split)
  ex = nvs.heldout_examples(src, 4, 1, seed=0)
  rep = lambda a: np.concatenate([a] * 3)  # 12 examples
  source, rays, target_rays = rep(ex["source"]), rep(ex["source_rays"]), rep(ex["target_rays"])
  monkeypatch.setattr(nvs, "CHUNK", 8)
  rng = jax.random.PRNGKey(3)
  mesh = sharding.make_mesh(config)  # 8 devices
  out = nvs.sample_views(model, variables, source, rays, target_rays, rng, config.diffusion, mesh)
  programs = nvs._step.__wrapped__._cache_size()  # pylint: disable=protected-access
  assert isinstance(out, np.ndarray) and out.shape == (12, 16, 16, 3)
  assert np.isfinite(out).all() and np.abs(out).max() <= 1
  first = nvs.sample_views(model, variables, source[:8], rays[:8], target_rays[:8], rng,
                           config.diffusion, mesh)
  np.testing.assert_array_equal(out[:8], first)
  # The second chunk draws its own noise: its copy of objects 0-3 differs from the first's.
  assert np.abs(out[8:] - out[:4]).max() > 1e-3
  # Padded to 3 views (masked out of z) the 1-view samples are the same up to float rounding
  # (the encoder runs on 3x the images), and a padding row of the chunk does not poison them.
  padded = nvs.sample_views(model, variables, source[:5], rays[:5], target_rays[:5], rng,
                            config.diffusion, mesh, num_views=3, rows=8)
  np.testing.assert_allclose(padded, first[:5], atol=1e-5)
  # Every step of the calls after the first ran the step program the first built on the mesh
  # (x keeps its layout).
  assert nvs._step.__wrapped__._cache_size() == programs  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="num_views=0 is fewer than the 1 source views"):
    nvs.sample_views(model, variables, source, rays, target_rays, rng, config.diffusion, mesh,
                     num_views=0)
