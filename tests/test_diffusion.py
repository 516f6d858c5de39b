"""Diffusion maths against closed forms: schedules, targets, noising, masks, DDIM and guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax import diffusion as d

KEY = jax.random.PRNGKey(0)


def _normal(i, shape):
  return jax.random.normal(jax.random.fold_in(KEY, i), shape)


# ------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------
def _alpha_bar_f64(t, schedule):
  """Float64 closed forms (no clip), as the paper / DDPM write them."""
  t = np.asarray(t, np.float64)
  if schedule == "inverted":
    return np.arccos(2 * t - 1) / np.pi
  if schedule == "cosine":
    return np.cos(np.pi * t / 2) ** 2
  return np.exp(-1000 * (1e-4 * t + (0.02 - 1e-4) * t ** 2 / 2))


@pytest.mark.parametrize("schedule", d.SCHEDULES)
def test_schedule_ends_and_monotone(schedule):
  a0, a1 = np.asarray(d.alpha_bar(jnp.array([0.0, 1.0]), schedule))
  assert a0 == pytest.approx(d.ALPHA_BAR_MAX, abs=1e-7)
  assert d.ALPHA_BAR_MIN - 1e-9 <= a1 < 1e-4  # linear ends at exp(-10.05) = 4.3e-5, unclipped.
  grid = jnp.linspace(0.0, 1.0, 10001)
  a = np.asarray(d.alpha_bar(grid, schedule))
  assert np.all(np.diff(a) <= 0)  # Flat only where clipped.
  inner = jnp.linspace(0.01, 0.99, 981)
  assert np.all(np.diff(np.asarray(d.alpha_bar(inner, schedule))) < 0)
  assert np.all(np.diff(np.asarray(d.log_snr(inner, schedule))) < 0)


def test_schedule_known_values():
  t = jnp.array([0.1, 0.25, 0.5, 0.9])
  for schedule in d.SCHEDULES:
    np.testing.assert_allclose(d.alpha_bar(t, schedule), _alpha_bar_f64(t, schedule), rtol=1e-5)
  assert abs(float(d.alpha_bar(0.5, "inverted")) - 0.5) < 1e-6


def test_inverted_is_inverse_of_cosine():
  t = jnp.linspace(0.01, 0.99, 981)  # Away from the clip boundaries.
  inv_cos = d.alpha_bar(d.alpha_bar(t, "cosine"), "inverted")
  cos_inv = d.alpha_bar(d.alpha_bar(t, "inverted"), "cosine")
  np.testing.assert_allclose(inv_cos, t, atol=1e-5)
  np.testing.assert_allclose(cos_inv, t, atol=1e-5)


@pytest.mark.parametrize("schedule", d.SCHEDULES)
def test_log_snr(schedule):
  """Against float64 log(a / (1 - a)); a float32 `1 - a` would be off by 1e-3 near t=0."""
  t = jnp.linspace(0.0, 1.0, 1001)
  a = np.clip(_alpha_bar_f64(t, schedule), d.ALPHA_BAR_MIN, 1 - 1e-5)
  np.testing.assert_allclose(d.log_snr(t, schedule), np.log(a / (1 - a)), atol=1e-5, rtol=1e-5)
  a32, s32 = d.alpha_bar_pair(t, schedule)
  np.testing.assert_allclose(s32, 1 - a, rtol=1e-5)  # 1 - a is accurate where it is tiny.
  np.testing.assert_allclose(a32, a, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Targets, noising, loss.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", d.SCHEDULES)
def test_prediction_conversions_round_trip(schedule):
  """Every pred type -> (x0, eps) -> every pred type. eps -> x0 divides by sqrt(a) and x0 -> eps
  by sqrt(1-a), so compare where a in [0.01, 0.99]; v is checked over all of [0, 1] below."""
  n = 4096
  x0, eps = _normal(1, (n, 2, 2, 1)), _normal(2, (n, 2, 2, 1))
  t = jax.random.uniform(jax.random.fold_in(KEY, 3), (n,))
  a = np.asarray(d.alpha_bar(t, schedule))
  ok = (a > 0.01) & (a < 0.99)
  assert ok.sum() > n // 2
  x_t = d.q_sample(x0, t, eps, schedule)
  for p in d.PRED_TYPES:
    x0_hat, eps_hat = d.to_x0_eps(d.target_for(p, x0, eps, t, schedule), p, x_t, t, schedule)
    for q in d.PRED_TYPES:
      got = d.target_for(q, x0_hat, eps_hat, t, schedule)
      want = d.target_for(q, x0, eps, t, schedule)
      np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], atol=1e-5,
                                 err_msg=f"{p} -> {q}")


@pytest.mark.parametrize("schedule", d.SCHEDULES)
def test_v_conversion_is_well_conditioned_everywhere(schedule):
  t = jnp.array([0.0, 1e-4, 0.5, 1 - 1e-4, 1.0])
  x0, eps = _normal(4, (5, 3, 3, 2)), _normal(5, (5, 3, 3, 2))
  x_t = d.q_sample(x0, t, eps, schedule)
  x0_hat, eps_hat = d.to_x0_eps(d.target_for("v", x0, eps, t, schedule), "v", x_t, t, schedule)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-5)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_q_sample_moments(t):
  n, c = 200_000, 0.7
  noise = _normal(6, (n, 1, 1, 1))
  x = np.asarray(d.q_sample(jnp.full((n, 1, 1, 1), c), jnp.full((n,), t), noise, "inverted"),
                 np.float64)
  a = float(np.arccos(2 * t - 1) / np.pi)
  se_mean = np.sqrt((1 - a) / n)
  se_var = (1 - a) * np.sqrt(2 / n)
  assert abs(x.mean() - np.sqrt(a) * c) < 4 * se_mean
  assert abs(x.var() - (1 - a)) < 4 * se_var


def test_diffusion_loss_and_weighting():
  b = 6
  x0, eps = _normal(7, (b, 4, 4, 3)), _normal(8, (b, 4, 4, 3))
  t = jnp.linspace(0.05, 0.95, b)
  delta = _normal(9, (b, 4, 4, 3))
  x_t = d.q_sample(x0, t, eps, "inverted")
  snr = np.exp(np.asarray(d.log_snr(t, "inverted"), np.float64))
  x0_errs = {}
  for p in d.PRED_TYPES:
    pred = d.target_for(p, x0, eps, t, "inverted") + 0.1 * delta
    plain = d.diffusion_loss(pred, x0, eps, t, pred_type=p, schedule="inverted")
    np.testing.assert_allclose(plain, np.mean(np.asarray(0.1 * delta) ** 2, axis=(1, 2, 3)),
                               rtol=1e-5)
    assert plain.shape == (b,)
    exact = d.diffusion_loss(pred - 0.1 * delta, x0, eps, t, pred_type=p, schedule="inverted")
    np.testing.assert_allclose(exact, 0.0, atol=1e-10)
    weighted = d.diffusion_loss(pred, x0, eps, t, pred_type=p, schedule="inverted",
                                weighting="snr_clip")
    # Every pred type must give min(SNR, 5) * |x0_hat - x0|^2.
    x0_hat, _ = d.to_x0_eps(pred, p, x_t, t, "inverted")
    x0_errs[p] = np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(weighted, np.minimum(snr, 5.0) * x0_errs[p], rtol=1e-4)
    if p == "eps":  # Relative to eps: min(SNR, 5) / SNR.
      np.testing.assert_allclose(weighted, plain * np.minimum(snr, 5.0) / snr, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Masks and timesteps.
# ------------------------------------------------------------------------------------------------
def test_sample_masks_rates_and_independence():
  b, m = 100_000, 4
  r_l, r_d, r_p = 0.15, 0.1, 0.3
  keep, pose_keep = d.sample_masks(KEY, b, m, layer_mask_rate=r_l, latent_drop_rate=r_d,
                                   pose_drop_rate=r_p)
  assert keep.shape == (b, m) and keep.dtype == jnp.bool_
  assert pose_keep.shape == (b,) and pose_keep.dtype == jnp.bool_
  keep, pose_keep = np.asarray(keep), np.asarray(pose_keep)

  def within_3_sigma(samples, p):
    samples = np.asarray(samples, np.float64)
    assert abs(samples.mean() - p) < 3 * np.sqrt(p * (1 - p) / samples.size), (samples.mean(), p)

  within_3_sigma(~keep, 1 - (1 - r_l) * (1 - r_d))  # A sub-vector is off.
  all_off = ~keep.any(axis=1)
  within_3_sigma(all_off, r_d + (1 - r_d) * r_l ** m)  # Whole latent off.
  within_3_sigma(~pose_keep, r_p)
  # Rows with some sub-vector on: the layer draws alone, no latent drop.
  within_3_sigma(~keep[~all_off], r_l * (1 - r_l ** (m - 1)) / (1 - r_l ** m))
  # Pose drops are independent of latent drops.
  within_3_sigma(~pose_keep[all_off], r_p)
  within_3_sigma(~pose_keep[~all_off], r_p)
  assert abs(np.corrcoef(all_off, ~pose_keep)[0, 1]) < 3 / np.sqrt(b)


def test_sample_masks_separate_rates_and_extremes():
  b, m = 20_000, 3
  keep, _ = d.sample_masks(KEY, b, m, layer_mask_rate=0.0, latent_drop_rate=0.25,
                           pose_drop_rate=0.0)
  keep = np.asarray(keep)
  assert np.all(keep.all(1) | ~keep.any(1))  # Latent drop only: rows all on or all off.
  assert abs((~keep[:, 0]).mean() - 0.25) < 3 * np.sqrt(0.25 * 0.75 / b)
  keep, pose_keep = d.sample_masks(KEY, 64, m, layer_mask_rate=0.0, latent_drop_rate=0.0,
                                   pose_drop_rate=0.0)
  assert np.all(keep) and np.all(pose_keep)
  keep, pose_keep = d.sample_masks(KEY, 64, m, layer_mask_rate=1.0, latent_drop_rate=0.0,
                                   pose_drop_rate=1.0)
  assert not np.any(keep) and not np.any(pose_keep)
  keep, _ = d.sample_masks(KEY, 64, m, layer_mask_rate=0.0, latent_drop_rate=1.0,
                           pose_drop_rate=0.0)
  assert not np.any(keep)


def test_timesteps():
  t = np.asarray(d.timesteps(KEY, 50_000))
  assert t.shape == (50_000,) and t.min() >= 0 and t.max() < 1
  assert abs(t.mean() - 0.5) < 3 * np.sqrt(1 / 12 / t.size)
  # power = 1 is exactly the uniform draw (no 1 - (1 - u) round trip), so old runs replay.
  np.testing.assert_array_equal(d.timesteps(KEY, 100, 1.0), jax.random.uniform(KEY, (100,)))


def test_timesteps_power_moves_mass_to_high_noise():
  p = 3.0
  t = np.asarray(d.timesteps(KEY, 50_000, p))
  assert t.min() >= 0 and t.max() <= 1
  # t = 1 - (1 - u)^p: E[t] = p / (p + 1), P(t > x) = (1 - x)^(1 / p).
  assert abs(t.mean() - p / (p + 1)) < 0.005
  assert abs(np.mean(t > 0.9) - 0.1 ** (1 / p)) < 0.01  # 0.464 (uniform: 0.1)
  with pytest.raises(ValueError, match="t_power=0.0"):
    d.timesteps(KEY, 4, 0.0)


# ------------------------------------------------------------------------------------------------
# DDIM.
# ------------------------------------------------------------------------------------------------
def _sample(predict_fn, x_T, rng=KEY, **kw):
  """ddim_sample over a jitted ddim_update (static keywords, rng and k traced), as callers use
  them."""
  step = jax.jit(lambda x, k, r: d.ddim_update(predict_fn, x, k, rng=r, **kw))
  return d.ddim_sample(lambda x, k: step(x, k, rng), x_T, kw["num_steps"])


def _point_mass_predict(c, schedule, pred_type):
  """The exact model for data x0 = c: eps = (x_t - sqrt(a) c) / sqrt(1 - a)."""
  def predict(x_t, t, use_latent, use_pose):
    del use_latent, use_pose
    a = d.alpha_bar(t, schedule)[:, None, None, None]
    eps = (x_t - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)
    return d.target_for(pred_type, jnp.broadcast_to(c, x_t.shape), eps, t, schedule)
  return predict


@pytest.mark.parametrize("schedule,pred_type,eta", [
    ("inverted", "eps", 0.0), ("cosine", "eps", 0.0), ("linear", "eps", 0.0),
    ("inverted", "v", 0.0), ("inverted", "x0", 0.0), ("inverted", "eps", 1.0)])
def test_ddim_recovers_point_mass(schedule, pred_type, eta):
  c = jnp.tanh(_normal(10, (2, 4, 4, 3)))
  x_T = _normal(11, c.shape)
  for n in (1, 5, 50):
    out = _sample(_point_mass_predict(c, schedule, pred_type), x_T, num_steps=n, eta=eta,
                  schedule=schedule, pred_type=pred_type)
    np.testing.assert_allclose(out, c, atol=1e-4, err_msg=f"num_steps={n}")


@pytest.mark.parametrize("schedule,pred_type,t_start", [
    ("inverted", "eps", 1.0), ("cosine", "v", 1.0), ("linear", "x0", 1.0),
    ("inverted", "eps", 0.6)])
def test_ddim_standard_normal_data_matches_analytic_product(schedule, pred_type, t_start):
  """For x0 ~ N(0, 1), E[eps | x_t] = sqrt(1 - a) x_t and E[x0 | x_t] = sqrt(a) x_t; a DDIM step
  multiplies x by sqrt(a_s a_t) + sqrt((1 - a_s)(1 - a_t)); the output is sqrt(a_1) x_1."""
  n = 10

  def predict(x_t, t, use_latent, use_pose):
    del use_latent, use_pose
    a = d.alpha_bar(t, schedule)[:, None, None, None]
    return d.target_for(pred_type, jnp.sqrt(a) * x_t, jnp.sqrt(1 - a) * x_t, t, schedule)

  x_T = _normal(12, (3, 2, 2, 1))
  out = _sample(predict, x_T, num_steps=n, schedule=schedule, pred_type=pred_type,
                t_start=t_start)
  grid = t_start * np.arange(n + 1) / n
  a = np.asarray(d.alpha_bar(jnp.asarray(grid, jnp.float32), schedule), np.float64)
  factor = np.sqrt(a[1])
  for i in range(n, 1, -1):
    factor *= np.sqrt(a[i - 1] * a[i]) + np.sqrt((1 - a[i - 1]) * (1 - a[i]))
  np.testing.assert_allclose(out, factor * np.asarray(x_T), atol=1e-5, rtol=1e-5)


def test_ddim_step_eta_one_is_ddpm_posterior():
  """eta=1: mean = DDPM posterior mean of q(x_s | x_t, x0), std = its std."""
  t, s = 0.7, 0.55
  x0, eps, z = _normal(13, (2, 3, 3, 1)), _normal(14, (2, 3, 3, 1)), _normal(15, (2, 3, 3, 1))
  a_t, a_s = float(d.alpha_bar(t, "cosine")), float(d.alpha_bar(s, "cosine"))
  x_t = np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps
  beta = 1 - a_t / a_s
  mean = (np.sqrt(a_s) * beta / (1 - a_t)) * x0 + (np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x_t
  std = np.sqrt((1 - a_s) / (1 - a_t) * beta)
  got = d.ddim_step(x0, eps, t, s, schedule="cosine", eta=1.0, noise=z)
  np.testing.assert_allclose(got, mean + std * np.asarray(z), atol=1e-5)
  det = d.ddim_step(x0, eps, t, s, schedule="cosine", eta=0.0)
  np.testing.assert_allclose(det, np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps, atol=1e-6)


def test_ddim_sample_runs_the_steps_in_order_and_returns_the_last_x0():
  seen = []

  def step(x, k):
    seen.append(k)
    return x + 1, x * 10
  assert d.ddim_sample(step, jnp.zeros(()), 4) == 30  # x0_hat of step k=3, where x = 3
  assert seen == [0, 1, 2, 3]
  # An array, not a Python int: a traced argument of one program, and one signature for
  # multihost.compile_then_meet (a Python int would be a compile and a barrier per step).
  assert all(type(k) is np.int32 for k in seen)  # pylint: disable=unidiomatic-typecheck


def test_host_loop_matches_one_fori_loop_program():
  """ddim_sample over a jitted ddim_update is the same sampler as a lax.fori_loop of it (the
  form it had until session 36), eta > 0 included: the same t grid and per-step noise keys."""
  predict = lambda x, t, *_: 0.3 * x + 0.1 * t[:, None, None, None]  # noqa: E731
  x_T = _normal(19, (2, 3, 3, 1))
  kw = dict(num_steps=6, eta=0.7, schedule="inverted", pred_type="v", clip_x0=1.0)
  step = lambda x, k: d.ddim_update(predict, x, k, rng=KEY, **kw)  # noqa: E731
  looped = jax.jit(lambda x: jax.lax.fori_loop(
      0, 6, lambda k, c: step(c[0], k), (x, jnp.zeros_like(x)))[1])(x_T)
  np.testing.assert_allclose(d.ddim_sample(jax.jit(step), x_T, 6), looped, atol=1e-6)


def test_ddim_eta_noise_depends_on_rng():
  predict = lambda x, t, *_: 0.5 * x  # noqa: E731
  x_T = _normal(16, (2, 2, 2, 1))
  kw = dict(num_steps=4, eta=1.0, schedule="inverted", pred_type="eps")
  a = _sample(predict, x_T, **kw)
  b = _sample(predict, x_T, **kw)
  c = _sample(predict, x_T, rng=jax.random.PRNGKey(1), **kw)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_ddim_clip_x0_keeps_estimates_in_range_and_rederives_eps():
  """An eps model with a small error at t=1 (a = ALPHA_BAR_MIN): x0_hat = (x - sigma eps)/sqrt(a)
  is ~300x the error; clipped, the first step lands at the clipped x0 plus x_T's own noise."""
  x_T = _normal(18, (2, 4, 4, 1))
  predict = lambda x, t, *_: x + 0.05  # noqa: E731  (exact eps at t=1 would be ~x_T)
  kw = dict(num_steps=1, schedule="inverted", pred_type="eps", w_z=1.0, w_p=0.0)
  raw = np.asarray(_sample(predict, x_T, rng=None, **kw))
  assert np.abs(raw).max() > 10  # the failure clip_x0 exists for
  clipped = np.asarray(_sample(predict, x_T, rng=None, clip_x0=1.0, **kw))
  np.testing.assert_allclose(clipped, np.clip(raw, -1, 1))
  with pytest.raises(ValueError, match=r"clip_x0=0.0 must be > 0"):
    d.ddim_update(predict, x_T, 0, rng=None, clip_x0=0.0, **kw)
  # Two steps (t = 1 -> 0.5 -> out): the second step sees x_s built from the clipped x0_hat and
  # the eps re-derived from it, so |x_s| stays O(1) instead of ~sqrt(a_s) * 300 * 0.05.
  two = np.asarray(_sample(predict, x_T, rng=None, clip_x0=1.0, **dict(kw, num_steps=2)))
  x = np.asarray(x_T, np.float64)
  (a_t, s_t), (a_s, s_s) = [[float(v) for v in d.alpha_bar_pair(t, "inverted")] for t in (1., .5)]
  x0c = np.clip((x - np.sqrt(s_t) * (x + 0.05)) / np.sqrt(a_t), -1, 1)
  x_s = np.sqrt(a_s) * x0c + np.sqrt(s_s) * (x - np.sqrt(a_t) * x0c) / np.sqrt(s_t)
  expected = np.clip((x_s - np.sqrt(s_s) * (x_s + 0.05)) / np.sqrt(a_s), -1, 1)
  np.testing.assert_allclose(two, expected, atol=1e-5)


CONSTS = {(False, False): 0.1, (True, False): 0.3, (True, True): 0.7}


def _counting_predict(calls):
  def predict(x_t, t, use_latent, use_pose):
    calls.append((use_latent, use_pose))  # Runs at trace time: once per call site.
    return jnp.full_like(x_t, CONSTS[(use_latent, use_pose)]) + 0.01 * x_t * t[:, None, None, None]
  return predict


@pytest.mark.parametrize("w_z,w_p,expected", [
    (1.0, 0.0, [(True, False)]),
    (2.0, 0.0, [(False, False), (True, False)]),
    (1.0, 2.0, [(True, False), (True, True)]),
    (2.0, 3.0, [(False, False), (True, False), (True, True)]),
    (0.0, 0.0, [(False, False)]),
    (1.0, 1.0, [(True, True)])])
def test_guidance_calls_per_step(w_z, w_p, expected):
  calls = []
  jax.make_jaxpr(lambda x, k: d.ddim_update(_counting_predict(calls), x, k, rng=None,
                                            num_steps=7, schedule="inverted", pred_type="eps",
                                            w_z=w_z, w_p=w_p))(jnp.zeros((2, 2, 2, 1)), 3)
  assert calls == expected  # One traced step (k traced) serves all 7: calls per step.


def test_no_guidance_is_plain_conditional_prediction():
  x_T = _normal(17, (2, 4, 4, 1))
  kw = dict(num_steps=6, schedule="inverted", pred_type="v")
  predict = _counting_predict([])
  cond_only = lambda x, t, *_: predict(x, t, True, False)  # noqa: E731
  np.testing.assert_array_equal(_sample(predict, x_T, w_z=1.0, w_p=0.0, **kw),
                                _sample(cond_only, x_T, **kw))


@pytest.mark.parametrize("pred_type", d.PRED_TYPES)
@pytest.mark.parametrize("w_z,w_p", [(2.0, 0.0), (2.0, 3.0), (1.0, 1.5)])
def test_guidance_analytic_combination(pred_type, w_z, w_p):
  """One step from t=1 with constant predictions: the guided eps is
  e_u + w_z (e_z - e_u) + w_p (e_zp - e_z) of the eps-converted predictions, x0 from that eps."""
  x_T = _normal(18, (2, 3, 3, 1))
  predict = lambda x, t, lat, pose: jnp.full_like(x, CONSTS[(lat, pose)])  # noqa: E731
  out = _sample(predict, x_T, num_steps=1, schedule="cosine", pred_type=pred_type, w_z=w_z,
                w_p=w_p)
  t = jnp.ones((2,))
  e = {k: d.to_x0_eps(jnp.full_like(x_T, v), pred_type, x_T, t, "cosine")[1]
       for k, v in CONSTS.items()}
  e_u, e_z, e_zp = e[(False, False)], e[(True, False)], e[(True, True)]
  guided = e_u + w_z * (e_z - e_u) + w_p * (e_zp - e_z)
  a = float(d.alpha_bar(1.0, "cosine"))
  want = (np.asarray(x_T) - np.sqrt(1 - a) * np.asarray(guided)) / np.sqrt(a)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  if pred_type == "eps":  # Constants in eps space: closed form with the numbers themselves.
    g = 0.1 + w_z * (0.3 - 0.1) + w_p * (0.7 - 0.3)
    np.testing.assert_allclose(out, (np.asarray(x_T) - np.sqrt(1 - a) * g) / np.sqrt(a),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad arguments.
# ------------------------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument():
  x = jnp.zeros((2, 2, 2, 1))
  t = jnp.full((2,), 0.5)
  with pytest.raises(ValueError, match=r"schedule='foo' is not one of \('inverted', 'cosine', "
                                       r"'linear'\)"):
    d.alpha_bar(0.5, "foo")
  with pytest.raises(ValueError, match="schedule='foo'"):
    jax.jit(lambda t: d.log_snr(t, "foo"))(t)
  with pytest.raises(ValueError, match=r"pred_type='score' is not one of \('eps', 'v', 'x0'\)"):
    d.target_for("score", x, x, t, "inverted")
  with pytest.raises(ValueError, match="pred_type='score'"):
    d.to_x0_eps(x, "score", x, t, "inverted")
  with pytest.raises(ValueError, match=r"weighting='p2' is not one of \('none', 'snr_clip'\)"):
    d.diffusion_loss(x, x, x, t, pred_type="eps", schedule="inverted", weighting="p2")
  for name in ("layer_mask_rate", "latent_drop_rate", "pose_drop_rate"):
    rates = dict(layer_mask_rate=0.1, latent_drop_rate=0.1, pose_drop_rate=0.1)
    rates[name] = 1.5
    with pytest.raises(ValueError, match=rf"{name}=1.5 must be in \[0, 1\]"):
      d.sample_masks(KEY, 4, 3, **rates)
  predict = lambda x, t, *_: x  # noqa: E731
  kw = dict(rng=KEY, schedule="inverted", pred_type="eps")
  with pytest.raises(ValueError, match="num_steps=0 must be an int >= 1"):
    d.ddim_update(predict, x, 0, num_steps=0, **kw)
  with pytest.raises(ValueError, match="num_steps=2.5"):
    d.ddim_update(predict, x, 0, num_steps=2.5, **kw)
  with pytest.raises(ValueError, match="eta=-0.5 must be >= 0"):
    d.ddim_update(predict, x, 0, num_steps=2, eta=-0.5, **kw)
  with pytest.raises(ValueError, match="t_start=1.5"):
    d.ddim_update(predict, x, 0, num_steps=2, t_start=1.5, **kw)
  with pytest.raises(ValueError, match="w_z=.* must be a Python float"):
    d.ddim_update(predict, x, 0, num_steps=2, w_z=jnp.array(2.0), **kw)
  with pytest.raises(ValueError, match="w_p=.* must be a Python float"):
    d.ddim_update(predict, x, 0, num_steps=2, w_p="1", **kw)
  with pytest.raises(ValueError, match="rng=None"):
    d.ddim_update(predict, x, 0, num_steps=2, eta=1.0, **dict(kw, rng=None))
  with pytest.raises(ValueError, match="schedule='cos'"):
    d.ddim_update(predict, x, 0, num_steps=2, **dict(kw, schedule="cos"))
  step = lambda x, k: (x, x)  # noqa: E731
  with pytest.raises(ValueError, match="num_steps=0 must be an int >= 1"):
    d.ddim_sample(step, x, 0)
  with pytest.raises(ValueError, match="num_steps=True must be an int >= 1"):
    d.ddim_sample(step, x, True)


def test_vmap_matches_batch():
  """Per-example calls under vmap (scalar t) agree with the batched (B,) form."""
  x0, eps = _normal(19, (4, 2, 2, 3)), _normal(20, (4, 2, 2, 3))
  t = jnp.array([0.1, 0.4, 0.6, 0.95])
  one = lambda x, e, s: d.q_sample(x[None], s[None], e[None], "linear")[0]  # noqa: E731
  np.testing.assert_allclose(jax.vmap(one)(x0, eps, t), d.q_sample(x0, t, eps, "linear"),
                             rtol=1e-6)
  conv = lambda p, x, s: d.to_x0_eps(p, "v", x, s, "cosine")  # noqa: E731
  got, want = jax.vmap(conv)(eps, x0, t), conv(eps, x0, t)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_global_modulation_drops_z_only_at_the_latent_rate():
  """One group: layer masking is not applied, so 'global' drops z as often as 'layer' drops all."""
  b = 50_000
  keep, _ = d.sample_masks(KEY, b, 1, layer_mask_rate=0.5, latent_drop_rate=0.1,
                           pose_drop_rate=0.0)
  off = ~np.asarray(keep)[:, 0]
  assert abs(off.mean() - 0.1) < 3 * np.sqrt(0.1 * 0.9 / b), off.mean()
