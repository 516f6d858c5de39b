"""z-usage probe: true / shuffled / dropped z scored on a held-out two-view batch."""
import jax
import jax.numpy as jnp
import numpy as np

from soda_jax import config_base, diffusion, sharding, train_step as ts
from soda_jax.evaluate import z_usage
from soda_jax.models import soda
from tests.test_config_checks import load_config
from tests.random_params import perturbed


def test_z_usage_is_one_at_init_and_sees_a_decoder_that_uses_z():
  c = load_config("tiny")
  model = ts.build_model(c)
  state, _, _ = ts.create_state(model, ts.make_optimizer(c), c, sharding.make_mesh(c),
                                jax.random.PRNGKey(0))
  batch = z_usage.heldout_pair_batch(c, 8)
  assert batch["source"].shape == (8, 16, 16, 1) and batch["target_box"].shape == (8, 4)
  np.testing.assert_array_equal(batch["source"], z_usage.heldout_pair_batch(c, 8)["source"])
  fn = z_usage.make_z_usage_fn(model, c, batch)  # DEFAULT_TS: 0.5, 0.9 and 1 (x_t = noise)
  # Zero-initialised latent projections: the decoder cannot see z, all three ways agree exactly.
  init = fn(state.eval_variables())
  assert {k for k in init if k.startswith("z_usage/gain")} == {
      "z_usage/gain_t0.5", "z_usage/gain_t0.9", "z_usage/gain_t1"}
  for t in ("0.5", "0.9", "1"):
    assert init[f"z_usage/true_t{t}"] == init[f"z_usage/shuffled_t{t}"] == \
        init[f"z_usage/dropped_t{t}"] > 0
    assert init[f"z_usage/gain_t{t}"] == 1.0
  # Random (non-zero) latent projections: the error depends on which z is given.
  variables = {"params": perturbed(jax.device_get(state.params))}
  used = fn(variables)
  for t in ("0.5", "0.9", "1"):
    assert used[f"z_usage/true_t{t}"] != used[f"z_usage/shuffled_t{t}"]
    assert used[f"z_usage/true_t{t}"] != used[f"z_usage/dropped_t{t}"]
  # Each name holds its own (t, way): the x0-error recomputed directly, one decoder call per way,
  # at t = 1 (the last of the mapped (t, way) pairs) with the function's noise (seed 0).
  @jax.jit  # one program (op by op, each op of the model would compile on its own)
  def direct(variables, x):
    _, z = model.apply(variables, x["source"], method=soda.SODA.encode)
    t = jnp.ones((8,), jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(0), x["target"].shape, jnp.float32)
    x_t = diffusion.q_sample(x["target"], t, noise, c.diffusion.schedule)
    keep = jnp.ones((8, model.num_subvectors), bool)
    errors = {}
    for way, zz, kk in (("true", z, keep), ("shuffled", jnp.roll(z, 1, axis=0), keep),
                        ("dropped", z, ~keep)):
      pred = model.apply(variables, x_t, t, zz, kk, x["target_box"], jnp.ones((8,), bool),
                         method=soda.SODA.denoise)
      x0, _ = diffusion.to_x0_eps(pred, c.diffusion.pred_type, x_t, t, c.diffusion.schedule)
      errors[way] = jnp.mean(jnp.square(x0 - x["target"]))
    return errors

  for way, error in direct(variables, batch).items():
    np.testing.assert_allclose(used[f"z_usage/{way}_t1"], float(error), rtol=1e-5)


def test_z_usage_on_posed_multiview_examples():
  """3-D configs: K posed source views of a held-out object -> a target from another camera."""
  c = load_config("nvs_synthetic", "variant=tiny")
  model = ts.build_model(c)
  state, _, _ = ts.create_state(model, ts.make_optimizer(c), c, sharding.make_mesh(c),
                                jax.random.PRNGKey(0))
  batch = z_usage.heldout_pair_batch(c, 4)
  k, size = c.data.num_source_views, c.data.image_size
  assert batch["source"].shape == (4, k, size, size, 3)
  assert batch["source_rays"].shape == (4, k, size, size, 6)
  assert batch["target_rays"].shape == (4, size, size, 6) and batch["source_mask"].shape == (4, k)
  assert "target_box" not in batch
  fn = z_usage.make_z_usage_fn(model, c, batch, ts=(0.9,))
  init = fn(state.eval_variables())
  assert init["z_usage/true_t0.9"] == init["z_usage/shuffled_t0.9"] == init["z_usage/dropped_t0.9"]
  used = fn(ts.model_variables(perturbed(jax.device_get(state.params)), state.batch_stats))
  assert used["z_usage/true_t0.9"] != used["z_usage/shuffled_t0.9"]
