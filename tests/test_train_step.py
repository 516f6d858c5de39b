"""The train step's bookkeeping: per-part gradient norms, EMA of params *and* BatchNorm stats."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from soda_jax import config_base, sharding, train_step as ts
from tests import bn_tiny
from tests.test_config_checks import load_config


def test_part_grad_norms_partition_the_global_norm():
  grads = {"encoder": {"conv": {"kernel": jnp.full((3,), 2.0)}},
           "head": {"kernel": jnp.ones((2, 2))},
           "decoder": {"up_0_res_0": {"latent_proj": {"kernel": jnp.full((4,), 3.0)},
                                      "conv_0": {"kernel": jnp.ones((5,))}}}}
  norms = ts.part_grad_norms(grads)
  np.testing.assert_allclose(norms["grad_norm/encoder"], np.sqrt(12.0), rtol=1e-6)
  np.testing.assert_allclose(norms["grad_norm/head"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(norms["grad_norm/latent_proj"], 6.0, rtol=1e-6)
  np.testing.assert_allclose(norms["grad_norm/decoder_rest"], np.sqrt(5.0), rtol=1e-6)
  total = sum(float(v) ** 2 for v in norms.values())
  np.testing.assert_allclose(total, float(jnp.sum(jnp.asarray(
      [jnp.sum(g ** 2) for g in jax.tree.leaves(grads)]))), rtol=1e-6)
  with pytest.raises(ValueError, match="'pose_net/kernel' belongs to none of"):
    ts.part_grad_norms({"pose_net": {"kernel": jnp.ones(2)}})


def test_small_leaves_stay_whole_and_only_indivisible_ones_are_counted():
  """mesh.min_shard_elements: a leaf under it is replicated by choice (not counted); above it,
  a dim its mesh axes do not divide is replicated and counted."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  box = lambda shape: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32),
                                              ("conv_in", "conv_out"))
  tree = {"big": box((64, 64)), "odd": box((64, 3)), "small": box((8, 8))}
  rules = config_base.base_config().sharding_rules
  out, counted = sharding.logical_shardings(tree, mesh, rules, min_elements=100)
  assert (out["big"].spec, out["odd"].spec, out["small"].spec) == (P(None, "fsdp"), P(None, None),
                                                                   P())
  assert counted == 1 and sharding.num_below(nn.meta.unbox(tree), 100) == 1
  out, counted = sharding.logical_shardings(tree, mesh, rules)  # no floor: the 8x8 splits too
  assert out["small"].spec == P(None, "fsdp") and counted == 1


@pytest.mark.xdist_group("export")  # bn_tiny's train step, compiled once for the export tests
def test_ema_tracks_batch_stats_and_eval_pairs_them():
  """BatchNorm encoder (v1.5): after a step, ema_batch_stats = d * old + (1 - d) * new, and the
  evaluation variables pair EMA params with EMA statistics (not the online ones).

  At the config's own decay (0.999) the EMA moves 1e-3 of the way, ~1e-5 to 1e-4 here: far
  above the float32 tolerance below, so neither 'old' nor 'new' passes for the EMA."""
  c = bn_tiny.config()
  d = c.optim.ema_decay
  mesh = sharding.make_mesh(c)
  model, tx = ts.build_model(c), ts.make_optimizer(c)
  state, shardings, _ = ts.create_state(model, tx, c, mesh, jax.random.PRNGKey(0))
  assert state.batch_stats, "v1.5 encoder must have BatchNorm statistics"
  rs = np.random.RandomState(0)
  b, s, ch = c.batch_size, c.data.image_size, c.data.channels
  batch = {"source": rs.uniform(-1, 1, (b, s, s, ch)).astype(np.float32),
           "target": rs.uniform(-1, 1, (b, s, s, ch)).astype(np.float32),
           "target_box": np.tile(np.float32([[0, 0, 1, 1]]), (b, 1))}
  step = ts.jit_train_step(model, tx, c, mesh, shardings)
  old = jax.device_get(state.batch_stats)
  new_state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)),
                            jax.random.PRNGKey(1))
  online = jax.device_get(new_state.batch_stats)
  ema = jax.device_get(new_state.ema_batch_stats)
  expected = jax.tree.map(lambda o, n: d * o + (1 - d) * n, old, online)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               ema, expected)
  for reference in (old, online):  # the tolerance does tell the EMA from either end
    assert any(not np.allclose(e, r, rtol=1e-6, atol=1e-7)
               for e, r in zip(jax.tree.leaves(ema), jax.tree.leaves(reference)))
  ev = new_state.eval_variables()
  assert ev["batch_stats"] is new_state.ema_batch_stats and ev["params"] is new_state.ema_params
  assert new_state.eval_variables(use_ema=False)["batch_stats"] is new_state.batch_stats
  for part in ("encoder", "head", "latent_proj", "decoder_rest"):
    assert np.isfinite(float(metrics[f"grad_norm/{part}"]))
  # Zero-initialised chain: at step 0 nothing reaches z, so encoder and head get no gradient.
  assert float(metrics["grad_norm/encoder"]) == 0.0 == float(metrics["grad_norm/head"])
  assert float(metrics["grad_norm/decoder_rest"]) > 0


def test_calibrated_batch_stats_match_the_data():
  """Re-estimated BatchNorm statistics: eval mode then reproduces train mode (batch statistics)
  on the calibration images, which the initial (0, 1) statistics do not."""
  from soda_jax.evaluate import representation
  from soda_jax.models import soda
  c = config_base.override(load_config("tiny"), {"model.encoder.version": "v1.5"})
  model = ts.build_model(c)
  state, _, _ = ts.create_state(model, ts.make_optimizer(c), c, sharding.make_mesh(c),
                                jax.random.PRNGKey(0))
  x = np.random.RandomState(0).uniform(-1, 1, (32, 16, 16, 1)).astype(np.float32) * 0.3 + 0.4
  v0 = jax.device_get(state.eval_variables())
  train_h = model.apply(v0, x, train=True, method=soda.SODA.encode, mutable=["batch_stats"])[0][0]
  init_h = model.apply(v0, x, method=soda.SODA.encode)[0]
  cal = representation.calibrate_batch_stats(model, v0, x, batch_size=32, passes=80)
  cal_h = model.apply(cal, x, method=soda.SODA.encode)[0]
  err = lambda a: float(jnp.max(jnp.abs(a - train_h)) / jnp.max(jnp.abs(train_h)))
  # Measured: 0.13 calibrated vs 0.97 with the initial statistics (relative max error). Why the
  # calibrated residual is not ~0 after 80 passes over one batch is not yet understood.
  assert err(cal_h) < 0.25 * err(init_h), (err(cal_h), err(init_h))
  jax.tree.map(np.testing.assert_array_equal, cal["params"], v0["params"])  # weights untouched


def test_lr_schedule_warmup_then_cosine_or_constant():
  c = config_base.override(load_config("tiny"), {
      "num_train_steps": 100, "optim.warmup_steps": 10, "optim.lr": 1e-3,
      "optim.lr_schedule": "cosine"})
  lr = lambda cfg, s: float(ts.lr_schedule(cfg)(s))  # noqa: E731
  np.testing.assert_allclose([lr(c, s) for s in (0, 5, 10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  # Cosine from the end of warm-up to 0 at num_train_steps: half-way (step 55) is lr / 2.
  np.testing.assert_allclose([lr(c, 55), lr(c, 100)], [5e-4, 0.0], rtol=1e-5, atol=1e-9)
  const = config_base.override(c, {"optim.lr_schedule": "constant"})
  np.testing.assert_allclose([lr(const, s) for s in (5, 10, 55, 100, 10**6)],
                             [5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_programs_are_shared_by_configs_that_differ_in_run_only_fields():
  """Seed, logging, checkpointing, evals and (under a constant schedule) the run's length do
  not reach the programs: configs that differ only there get the same `ts.programs` (built
  once per process); a change that does reach them, or the length under a cosine schedule,
  gets its own. The programs are built from a config without those fields, so reading one
  there would fail rather than be served another run's program."""
  c = load_config("tiny")  # constant schedule
  mesh = sharding.make_mesh(c)
  run_only = config_base.override(c, {
      "seed": 7, "num_train_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 1,
      "keep_checkpoints": 1, "async_checkpointing": False, "compilation_cache_dir": "",
      "evals.num_samples": 0, "evals.probe_every_steps": 5})
  assert ts.program_config(run_only) == ts.program_config(c)
  assert ts.programs(run_only, mesh) is ts.programs(c, mesh)
  pc = ts.program_config(c)
  assert not any(k in pc for k in ts.RUN_ONLY_FIELDS + ("num_train_steps",)), pc.keys()
  assert ts.programs(config_base.override(c, {"optim.lr": 2e-3}), mesh) is not \
      ts.programs(c, mesh)
  cosine = config_base.override(c, {"optim.lr_schedule": "cosine"})
  assert ts.program_config(config_base.override(cosine, {"num_train_steps": 3})) != \
      ts.program_config(cosine)
