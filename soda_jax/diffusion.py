"""Gaussian diffusion in continuous time t in [0, 1]: schedules, noising, targets, loss, DDIM.

Everything here is pure `jnp` (jit-able, vmappable, randomness only from explicit keys). String
and scale arguments are checked in Python before anything is traced, so a typo fails at once with
a message naming the argument and its value.

Notation: a = alpha_bar(t), x_t = sqrt(a) x0 + sqrt(1 - a) eps, SNR = a / (1 - a).
Each schedule computes a and 1 - a by separate closed forms (never `1 - a` in float32), so both
stay accurate at the ends of [0, 1], where one of them is tiny.
"""
import numbers
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("inverted", "cosine", "linear")
PRED_TYPES = ("eps", "v", "x0")
WEIGHTINGS = ("none", "snr_clip")

# alpha_bar is clipped to this range so that SNR, 1/sqrt(a) and 1/sqrt(1-a) stay finite.
ALPHA_BAR_MIN = 1e-5
ALPHA_BAR_MAX = 1.0 - 1e-5
# DDPM's linear betas (1e-4 .. 0.02 over 1000 steps), as a continuous-time rate.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_NUM_STEPS = 1000
# Min-SNR-gamma (Hang et al. 2023): the effective x0-space weight is min(SNR, gamma).
SNR_CLIP_GAMMA = 5.0

# predict_fn(x_t (B, ...), t (B,), use_latent, use_pose) -> model output in pred_type space.
PredictFn = Callable[[jax.Array, jax.Array, bool, bool], jax.Array]


# ------------------------------------------------------------------------------------------------
# Argument checks (Python, before tracing).
# ------------------------------------------------------------------------------------------------
def _one_of(name: str, value, allowed) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


def _python_number(name: str, value) -> float:
  """Scales that steer Python-side decisions (which calls to make) must be concrete numbers."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f"{name}={value!r} must be a Python float (it is used to decide, before "
                     "tracing, which model calls to make)")
  return float(value)


def _check_rate(name: str, value) -> None:
  # Traced rates cannot be checked; config_checks validates them up front anyway.
  if isinstance(value, (numbers.Real, np.floating, np.integer)) and not 0.0 <= value <= 1.0:
    raise ValueError(f"{name}={value!r} must be in [0, 1]")


def _expand(c: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) per-example coefficients -> (B, 1, ..., 1) to broadcast against x (B, H, W, C)."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


# ------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------
def _linear_integral(t: jax.Array) -> jax.Array:
  """Integral of beta(u) du over [0, t] for beta rising linearly from b0 to b1 across N steps."""
  b0, b1, n = LINEAR_BETA_START, LINEAR_BETA_END, LINEAR_NUM_STEPS
  return n * (b0 * t + (b1 - b0) * t * t / 2)


def alpha_bar_pair(t, schedule: str) -> Tuple[jax.Array, jax.Array]:
  """(alpha_bar(t), 1 - alpha_bar(t)), each from its own formula and clipped consistently.

  inverted: a = arccos(2t - 1) / pi, computed as (2/pi) arcsin(sqrt(1 - t)) and 1 - a as
    (2/pi) arcsin(sqrt(t)) (the same functions, by cos(2u) = 1 - 2 sin(u)^2), accurate at both ends.
    It is the inverse function of the cosine schedule: with c(t) = cos(pi t / 2)^2,
    inverted(c(t)) = arccos(cos(pi t)) / pi = t and c(inverted(u)) = (1 + (2u - 1)) / 2 = u.
  cosine: a = cos(pi t / 2)^2 = sin(pi (1 - t) / 2)^2 (no offset s; the clip bounds SNR instead).
  linear: a = exp(-int_0^t beta), the continuous-time DDPM linear schedule; a(1) = exp(-10.05).
  """
  _one_of("schedule", schedule, SCHEDULES)
  t = jnp.asarray(t, jnp.float32)
  if schedule == "inverted":
    a = (2 / np.pi) * jnp.arcsin(jnp.sqrt(jnp.clip(1 - t, 0.0, 1.0)))
    s = (2 / np.pi) * jnp.arcsin(jnp.sqrt(jnp.clip(t, 0.0, 1.0)))
  elif schedule == "cosine":
    a = jnp.sin(np.pi / 2 * (1 - t)) ** 2
    s = jnp.sin(np.pi / 2 * t) ** 2
  else:
    lam = _linear_integral(t)
    a, s = jnp.exp(-lam), -jnp.expm1(-lam)
  # a + s = 1, so a hits MAX exactly where s hits MIN: the clipped pair still sums to 1.
  return (jnp.clip(a, ALPHA_BAR_MIN, ALPHA_BAR_MAX), jnp.clip(s, ALPHA_BAR_MIN, ALPHA_BAR_MAX))


def alpha_bar(t, schedule: str) -> jax.Array:
  """Signal fraction a(t), decreasing from ~1 at t=0 to ~0 at t=1, clipped to [MIN, MAX]."""
  return alpha_bar_pair(t, schedule)[0]


def log_snr(t, schedule: str) -> jax.Array:
  """log(a / (1 - a)), from the separately computed a and 1 - a (no cancellation)."""
  a, s = alpha_bar_pair(t, schedule)
  return jnp.log(a) - jnp.log(s)


def _alpha_sigma(t, schedule: str, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """sqrt(a), sqrt(1 - a), shaped to broadcast against x and in x's dtype."""
  a, s = alpha_bar_pair(t, schedule)
  return _expand(jnp.sqrt(a), x).astype(x.dtype), _expand(jnp.sqrt(s), x).astype(x.dtype)


def timesteps(rng: jax.Array, batch_size: int, power: float = 1.0) -> jax.Array:
  """Training times (B,): t = 1 - (1 - u)^power, u ~ U(0, 1).

  power = 1 is the paper's t ~ U(0, 1). power > 1 moves mass toward t = 1 (density
  (1 - t)^(1/power - 1) / power): more steps at high noise, where the target is mostly hidden and
  the decoder can only lower its loss through z, so more of the gradient reaches the encoder.
  """
  power = _python_number("t_power", power)
  if not power > 0:
    raise ValueError(f"t_power={power!r} must be > 0")
  u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  return u if power == 1.0 else 1.0 - (1.0 - u) ** power


def q_sample(x0: jax.Array, t, noise: jax.Array, schedule: str) -> jax.Array:
  """x_t = sqrt(a) x0 + sqrt(1 - a) noise; t (B,) broadcasts over x0 (B, H, W, C)."""
  alpha, sigma = _alpha_sigma(t, schedule, x0)
  return alpha * x0 + sigma * noise


# ------------------------------------------------------------------------------------------------
# Prediction targets.
# ------------------------------------------------------------------------------------------------
def target_for(pred_type: str, x0: jax.Array, noise: jax.Array, t, schedule: str) -> jax.Array:
  """What a `pred_type` model should output: eps, x0 or v = sqrt(a) eps - sqrt(1 - a) x0.

  Also the reverse of `to_x0_eps`: it maps any (x0_hat, eps_hat) into pred_type space.
  """
  _one_of("pred_type", pred_type, PRED_TYPES)
  if pred_type == "eps":
    return noise
  if pred_type == "x0":
    return x0
  alpha, sigma = _alpha_sigma(t, schedule, x0)
  return alpha * noise - sigma * x0


def to_x0_eps(pred: jax.Array, pred_type: str, x_t: jax.Array, t,
              schedule: str) -> Tuple[jax.Array, jax.Array]:
  """A model output in pred_type space -> (x0_hat, eps_hat), both consistent with x_t.

  v is the well-conditioned one (x0 = sqrt(a) x_t - sqrt(1-a) v, eps = sqrt(1-a) x_t + sqrt(a) v);
  eps -> x0 divides by sqrt(a) (amplifies error near t=1), x0 -> eps by sqrt(1-a) (near t=0).
  """
  _one_of("pred_type", pred_type, PRED_TYPES)
  alpha, sigma = _alpha_sigma(t, schedule, x_t)
  if pred_type == "eps":
    return (x_t - sigma * pred) / alpha, pred
  if pred_type == "x0":
    return pred, (x_t - alpha * pred) / sigma
  return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred


def to_eps(pred: jax.Array, pred_type: str, x_t: jax.Array, t, schedule: str) -> jax.Array:
  return to_x0_eps(pred, pred_type, x_t, t, schedule)[1]


# ------------------------------------------------------------------------------------------------
# Loss.
# ------------------------------------------------------------------------------------------------
def loss_weight(t, *, pred_type: str, schedule: str, weighting: str = "none") -> jax.Array:
  """Per-example weight (B,) on the pred-space MSE.

  'snr_clip' (Min-SNR-gamma, gamma = SNR_CLIP_GAMMA = 5): relative to the eps-MSE the weight is
  min(SNR, 5) / SNR, i.e. eps-MSE is kept where SNR <= 5 and scaled down by 5/SNR at low noise.
  Since |d eps|^2 = SNR |d x0|^2 and |d v|^2 = (1 + SNR) |d x0|^2, the same objective,
  min(SNR, 5) |d x0|^2, is obtained for every pred_type with weights
    eps: min(1, 5/SNR)    v: min(SNR, 5) / (1 + SNR)    x0: min(SNR, 5).
  """
  _one_of("pred_type", pred_type, PRED_TYPES)
  _one_of("weighting", weighting, WEIGHTINGS)
  lsnr = log_snr(t, schedule)
  if weighting == "none":
    return jnp.ones_like(lsnr)
  g = SNR_CLIP_GAMMA
  if pred_type == "eps":
    return jnp.minimum(1.0, g * jnp.exp(-lsnr))
  if pred_type == "v":  # snr / (1 + snr) = sigmoid(lsnr), 1 / (1 + snr) = sigmoid(-lsnr).
    return jnp.minimum(jax.nn.sigmoid(lsnr), g * jax.nn.sigmoid(-lsnr))
  return jnp.minimum(jnp.exp(lsnr), g)


def diffusion_loss(pred: jax.Array, x0: jax.Array, noise: jax.Array, t, *, pred_type: str,
                   schedule: str, weighting: str = "none") -> jax.Array:
  """Per-example loss (B,): weight(t) * mean over H, W, C of (pred - target)^2, in float32."""
  target = target_for(pred_type, x0.astype(jnp.float32), noise.astype(jnp.float32), t, schedule)
  sq = jnp.square(pred.astype(jnp.float32) - target)
  per_example = jnp.mean(sq, axis=tuple(range(1, sq.ndim)))
  return loss_weight(t, pred_type=pred_type, schedule=schedule, weighting=weighting) * per_example


# ------------------------------------------------------------------------------------------------
# Conditioning dropout.
# ------------------------------------------------------------------------------------------------
def sample_masks(rng: jax.Array, batch_size: int, num_subvectors: int, *, layer_mask_rate,
                 latent_drop_rate, pose_drop_rate) -> Tuple[jax.Array, jax.Array]:
  """Which sub-vectors of z, and whether the pose, each example keeps.

  Returns keep: bool (B, num_subvectors), pose_keep: bool (B,). Sub-vectors drop independently
  with layer_mask_rate; with latent_drop_rate the whole z drops (row all False, the unconditional
  case guidance needs); the pose drops independently with pose_drop_rate. The three draws use
  separate fold_in keys so they are independent of each other.

  With one group (global modulation) a layer mask would be a second whole-latent drop, making the
  'global' ablation drop z ~19% of the time against ~10% for 'layer': it is not applied, so
  both modes drop the whole z at latent_drop_rate (plus, for 'layer', all groups by chance).
  """
  for name, rate in (("layer_mask_rate", layer_mask_rate), ("latent_drop_rate", latent_drop_rate),
                     ("pose_drop_rate", pose_drop_rate)):
    _check_rate(name, rate)
  sub_drop = jax.random.bernoulli(jax.random.fold_in(rng, 0),
                                  layer_mask_rate if num_subvectors > 1 else 0.0,
                                  (batch_size, num_subvectors))
  latent_drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), latent_drop_rate, (batch_size,))
  pose_drop = jax.random.bernoulli(jax.random.fold_in(rng, 2), pose_drop_rate, (batch_size,))
  keep = ~sub_drop & ~latent_drop[:, None]
  return keep, ~pose_drop


# ------------------------------------------------------------------------------------------------
# DDIM sampling with guidance.
# ------------------------------------------------------------------------------------------------
def guidance_coefficients(w_z: float, w_p: float) -> Tuple[Tuple[Tuple[bool, bool], float], ...]:
  """e = e_u + w_z (e_z - e_u) + w_p (e_zp - e_z), regrouped as a sum over the needed calls.

  Returns ((use_latent, use_pose), coefficient) for every call whose coefficient
  (1 - w_z, w_z - w_p, w_p) is nonzero: w_z=1, w_p=0 -> only e_z; w_p=0 -> no e_zp;
  w_z=1 -> no e_u; w_z=0, w_p=0 -> only e_u; w_z=w_p=1 -> only e_zp.
  """
  w_z, w_p = _python_number("w_z", w_z), _python_number("w_p", w_p)
  terms = (((False, False), 1.0 - w_z), ((True, False), w_z - w_p), ((True, True), w_p))
  return tuple((flags, c) for flags, c in terms if c != 0.0)


def guided_prediction(predict_fn: PredictFn, x_t: jax.Array, t: jax.Array, w_z: float,
                      w_p: float) -> jax.Array:
  """The guided model output, in the model's pred_type space.

  Guidance is defined on eps. The pred -> eps map is affine in pred with coefficients that depend
  only on (x_t, t), and the guidance coefficients sum to 1, so combining the raw predictions and
  then converting gives exactly the eps-space combination, with one conversion instead of three
  and without routing a v-model's x0 through the ill-conditioned eps -> x0 division.
  """
  out = None
  for (use_latent, use_pose), c in guidance_coefficients(w_z, w_p):
    p = predict_fn(x_t, t, use_latent, use_pose)
    p = p if c == 1.0 else c * p
    out = p if out is None else out + p
  return out


def ddim_step(x0_hat: jax.Array, eps_hat: jax.Array, t, s, *, schedule: str, eta: float = 0.0,
              noise: Optional[jax.Array] = None) -> jax.Array:
  """One DDIM update from time t to s < t (Song et al. 2021, eq. 12).

  x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps_hat + sigma noise, with
  sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s): eta=0 is deterministic DDIM,
  eta=1 is the DDPM ancestral step. t, s: scalars or (B,).
  """
  _one_of("schedule", schedule, SCHEDULES)
  eta = _python_number("eta", eta)
  if eta < 0:
    raise ValueError(f"eta={eta!r} must be >= 0")
  a_t, s_t = alpha_bar_pair(t, schedule)
  a_s, s_s = alpha_bar_pair(s, schedule)
  x_s = _expand(jnp.sqrt(a_s), x0_hat) * x0_hat
  if eta == 0.0:
    return x_s + _expand(jnp.sqrt(s_s), x0_hat) * eps_hat
  if noise is None:
    raise ValueError(f"ddim_step with eta={eta!r} > 0 needs noise")
  var = eta ** 2 * (s_s / s_t) * jnp.clip((a_s - a_t) / a_s, 0.0, 1.0)
  direction = jnp.sqrt(jnp.maximum(s_s - var, 0.0))
  return (x_s + _expand(direction, x0_hat) * eps_hat + _expand(jnp.sqrt(var), x0_hat) * noise)


def _check_num_steps(num_steps) -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
  return int(num_steps)


def ddim_update(predict_fn: PredictFn, x: jax.Array, k, *, rng: Optional[jax.Array],
                num_steps: int, eta: float = 0.0, schedule: str, pred_type: str,
                w_z: float = 1.0, w_p: float = 0.0, t_start: float = 1.0,
                clip_x0: Optional[float] = None) -> Tuple[jax.Array, jax.Array]:
  """Step k (0 .. N-1) of DDIM with N = num_steps on t_i = t_start * i / N, i = N - k.

  Evaluates the guided prediction at t_i (see `guided_prediction`; w_z, w_p must be Python
  floats because they decide, before tracing, which of the three model calls are made), converts
  it to (x0_hat, eps_hat) and steps x from t_i to t_{i-1}. Returns (x at t_{i-1}, x0_hat).
  k may be traced, so one compiled step serves every k (`ddim_sample` runs them). With eta > 0
  the noise of step i comes from fold_in(rng, i); rng may be None when eta == 0.
  clip_x0=c clips x0_hat to [-c, c] and re-derives eps_hat from it (ADM's clip_denoised): a
  safety net that keeps a bad early estimate inside the data range. It does not rescue an eps
  model under the inverted schedule (at t=1, a = ALPHA_BAR_MIN, x0_hat = (x_t - sigma eps)/sqrt(a)
  multiplies the eps error by ~300; demo recon 4.6 -> 5.7 dB with clipping); v-prediction does.
  """
  _one_of("schedule", schedule, SCHEDULES)
  _one_of("pred_type", pred_type, PRED_TYPES)
  n = _check_num_steps(num_steps)
  eta = _python_number("eta", eta)
  if eta < 0:
    raise ValueError(f"eta={eta!r} must be >= 0")
  if eta > 0 and rng is None:
    raise ValueError(f"rng=None but eta={eta!r} > 0 needs a key")
  t_start = _python_number("t_start", t_start)
  if not 0.0 < t_start <= 1.0:
    raise ValueError(f"t_start={t_start!r} must be in (0, 1]")
  guidance_coefficients(w_z, w_p)  # Validate the scales up front.
  if clip_x0 is not None:
    clip_x0 = _python_number("clip_x0", clip_x0)
    if not clip_x0 > 0:
      raise ValueError(f"clip_x0={clip_x0!r} must be > 0 (or None for no clipping)")
  b = x.shape[0]
  i = n - k  # n .. 1
  t = jnp.full((b,), t_start * (i / n), jnp.float32)
  s = jnp.full((b,), t_start * ((i - 1) / n), jnp.float32)
  pred = guided_prediction(predict_fn, x, t, w_z, w_p)
  x0_hat, eps_hat = to_x0_eps(pred, pred_type, x, t, schedule)
  if clip_x0 is not None:
    x0_hat = jnp.clip(x0_hat, -clip_x0, clip_x0)
    eps_hat = to_x0_eps(x0_hat, "x0", x, t, schedule)[1]
  noise = None
  if eta > 0:
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
  x_s = ddim_step(x0_hat, eps_hat, t, s, schedule=schedule, eta=eta, noise=noise)
  return x_s.astype(x.dtype), x0_hat.astype(x.dtype)


def ddim_sample(step_fn: Callable[[jax.Array, np.int32], Tuple[jax.Array, jax.Array]],
                x_T: jax.Array, num_steps: int) -> jax.Array:
  """x0_hat of the last DDIM step (t_1) from x_T (B, H, W, C): num_steps calls
  `x, x0_hat = step_fn(x, k)`, k = 0 .. N-1, normally a jitted `ddim_update` (one program for
  every k). Not x at t=0, which would only add sqrt(ALPHA_BAR_MIN)-sized noise back.

  The loop runs on the host, not as a `lax.fori_loop` inside one program: XLA:CPU (jaxlib
  0.10.2, Eigen's convolutions) computed wrong rows in such a loop of the denoiser from its 20th
  iteration on whenever two devices of one process ran it at the same time (the demo's and the
  3-D config's samplers on 2 CPU devices); the same steps as separate calls are exact
  (docs/benchmarks.md, "Session 36"). The steps are still dispatched asynchronously, and compile
  time still does not grow with num_steps.
  """
  x, x0_hat = x_T, None
  for k in range(_check_num_steps(num_steps)):
    x, x0_hat = step_fn(x, np.int32(k))
  return x0_hat
