"""Model-agnostic evaluation of frozen features: a linear probe (optax) and weighted k-NN, top-1.

Both take feature arrays (N, D) and integer labels, so they work for any encoder (h, z, ...).
The linear probe picks its weight decay on a split held out from TRAIN; test labels are used
only for the final top-1. Each fit is one jitted L-BFGS loop, the k-NN one jitted map over test
batches; all in float32.
"""
import functools
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

_HI = jax.lax.Precision.HIGHEST  # "compute in float32" also on GPU/TPU (no TF32/bf16 passes).


# ---------------------------------------------------------------------------------------------
# Validation: fail before compiling, with messages that name the argument and the bad value.
# ---------------------------------------------------------------------------------------------
def _check_features(name: str, x: Any) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(x.shape)}")
  bad = ~jnp.isfinite(x)
  if bool(jnp.any(bad)):
    row, col = (int(i[0]) for i in jnp.nonzero(bad, size=1))
    raise ValueError(f"{name} has {int(jnp.sum(bad))} non-finite values, e.g. {name}[{row}, {col}]"
                     f" = {float(x[row, col])}")
  return x


def _check_labels(name: str, y: Any, n: int, feats_name: str, num_classes: int) -> jax.Array:
  y = np.asarray(y)
  if y.ndim != 1 or y.shape[0] != n:
    raise ValueError(f"{name} must have shape ({n},) to match {feats_name}, got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} must be integer class ids, got dtype {y.dtype}")
  out = (y < 0) | (y >= num_classes)
  if out.any():
    i = int(np.argmax(out))
    raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), got {name}[{i}] = "
                     f"{int(y[i])}")
  return jnp.asarray(y, jnp.int32)


def _check_pair(train_x, train_y, test_x, test_y, num_classes):
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  train_x = _check_features("train_x", train_x)
  test_x = _check_features("test_x", test_x)
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train_x and test_x must have the same feature dim, got "
                     f"{tuple(train_x.shape)} and {tuple(test_x.shape)}")
  train_y = _check_labels("train_y", train_y, train_x.shape[0], "train_x", num_classes)
  test_y = _check_labels("test_y", test_y, test_x.shape[0], "test_x", num_classes)
  return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------------------------------------
# Standardisation.
# ---------------------------------------------------------------------------------------------
def standardize(train_feats, *others, eps: float = 1e-6) -> Tuple[jax.Array, ...]:
  """Centre and scale every array with train's per-dim mean/std, so no statistic sees test.

  Constant dims (std < eps) are only centred. Returns (train, *others) as float32 jax arrays.
  """
  train = jnp.asarray(train_feats, jnp.float32)
  mean, scale = _moments(train, eps)
  return tuple(_affine(a, mean, scale) for a in (train,) + others)


@jax.jit
def _moments(x, eps):
  mean = jnp.mean(x, axis=0)
  std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=0))
  return mean, jnp.where(std < eps, 1.0, std)


@jax.jit
def _affine(x, mean, scale):
  return (jnp.asarray(x, jnp.float32) - mean) / scale


# ---------------------------------------------------------------------------------------------
# Linear probe.
# ---------------------------------------------------------------------------------------------
# Rows used to estimate the feature covariance for the preconditioner, and the largest feature dim
# it is built for (eigh is O(D^3): ~2 s at D=2048 on 2 CPU cores).
_PRECOND_ROWS = 8192
_PRECOND_MAX_DIM = 4096


def _objective(params, x, y, sample_w, wd):
  """Weighted mean softmax cross-entropy + 0.5 * wd * |W|^2 (the bias is not decayed).

  W is (C, D): XLA:CPU then computes the weight gradient as one 'nc,nd->cd' product over X,
  4x faster at 60k x 2048 than the (D, C) layout's transposed product.
  """
  w, b = params
  logits = jnp.einsum("nd,cd->nc", x, w, precision=_HI) + b
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(ce * sample_w) / jnp.sum(sample_w) + 0.5 * wd * jnp.sum(w * w)


def _covariance_eig(x: jax.Array, seed: int) -> Tuple[jax.Array, jax.Array]:
  """Eigen-decomposition of the (standardised) features' covariance, from a row subsample.

  eigh runs with one BLAS thread: OpenBLAS's threads spin-wait, and on a shared 2-core machine
  eigh(2048 x 2048) took 20 s with two threads against 0.9 s with one.
  """
  n, d = x.shape
  if d > _PRECOND_MAX_DIM:
    return jnp.ones((d,), jnp.float32), jnp.eye(d, dtype=jnp.float32)
  rows = np.sort(np.random.default_rng(seed + 1).permutation(n)[:_PRECOND_ROWS])
  cov = _gram(x[jnp.asarray(rows)])
  with _one_blas_thread():
    return jax.block_until_ready(jnp.linalg.eigh(cov))


def _one_blas_thread():
  """Limits BLAS/LAPACK to one thread, including scipy's OpenBLAS, which jaxlib's eigh calls."""
  # pylint: disable=g-import-not-at-top
  import scipy.linalg.cython_lapack  # noqa: F401  (loaded first, or the limit misses it)
  import threadpoolctl  # ships with scikit-learn (requirements.txt)
  return threadpoolctl.threadpool_limits(1, user_api="blas")


@jax.jit
def _gram(x):
  return jnp.dot(x.T, x, precision=_HI) / x.shape[0]


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit(x, y, sample_w, wd, init_params, eigvals, eigvecs, tol, *, steps: int):
  """One full-batch L-BFGS fit, the whole loop jitted; stops after `steps` or at |g| <= tol |g(0)|.

  L-BFGS runs in preconditioned coordinates W = (W' * s) V^T with s = (eig + C wd + floor)^-1/2,
  roughly the inverse square root of the objective's Hessian at W = 0 (the floor, 1e-3 of the
  mean eigenvalue, bounds the gain in rank-deficient directions). The objective is unchanged,
  but correlated features (ResNet features are) no longer need hundreds of iterations: 51 in
  all against >500 for the whole sweep at 60k x 2048 with a 1/i covariance spectrum.
  One weight decay per call: vmapping optax.lbfgs over the sweep (its linesearch is a
  while_loop) ran several times slower on CPU than fitting them one after another.
  """
  num_classes = init_params[0].shape[0]
  eigvals = jnp.maximum(eigvals, 0.0)
  scale = jax.lax.rsqrt(eigvals + num_classes * wd + 1e-3 * jnp.mean(eigvals) + 1e-12)
  to_w = lambda wp: jnp.dot(wp * scale, eigvecs.T, precision=_HI)
  from_w = lambda w: jnp.dot(w, eigvecs, precision=_HI) / scale

  def loss(pp):
    return _objective((to_w(pp[0]), pp[1]), x, y, sample_w, wd)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  zeros = jax.tree.map(jnp.zeros_like, init_params)
  grad_tol = tol * otu.tree_norm(jax.grad(loss)(zeros))

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def not_done(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < steps) & (grad_norm > grad_tol))

  start = (from_w(init_params[0]), init_params[1])
  (w_p, b), state = jax.lax.while_loop(not_done, step, (start, opt.init(start)))
  return (to_w(w_p), b), otu.tree_get(state, "count")


@jax.jit
def _accuracy(params, x, y, sample_w):
  """Weighted top-1 of one linear classifier."""
  w, b = params
  hit = jnp.argmax(jnp.einsum("nd,cd->nc", x, w, precision=_HI) + b, axis=-1) == y
  return jnp.sum(hit * sample_w) / jnp.sum(sample_w)


def linear_probe(train_x, train_y, test_x, test_y, *, num_classes: int,
                 weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1),
                 val_fraction: float = 0.1, steps: int = 100, tol: float = 1e-3,
                 seed: int = 0) -> Dict[str, Any]:
  """Top-1 of a softmax linear classifier on standardised frozen features.

  The weight decay (0.5 * wd * |W|^2 added to the mean cross-entropy) is chosen by top-1 on a
  random `val_fraction` of TRAIN (ties go to the larger wd); the classifier is then refit on all
  of train with it and scored on test, whose labels are used for nothing else. With a single
  weight decay or val_fraction=0 there is no selection. Each fit is preconditioned full-batch
  L-BFGS for at most `steps` iterations, stopping early once |grad| <= tol * |grad at W = 0|;
  the sweep runs from the largest wd down, each fit warm-started from the previous one (a
  regularisation path), and the refit starts from the sweep's solution. Returns {"top1",
  "best_weight_decay", "val_top1_by_wd", "iterations"}; top-1s are fractions in [0, 1].
  """
  train_x, train_y, test_x, test_y = _check_pair(train_x, train_y, test_x, test_y, num_classes)
  num_classes = int(num_classes)
  wds = sorted({float(w) for w in weight_decays}, reverse=True)
  if not wds or any(not np.isfinite(w) or w < 0 for w in wds):
    raise ValueError(f"weight_decays must be finite values >= 0, got {tuple(weight_decays)}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  n, d = train_x.shape
  train_x, test_x = standardize(train_x, test_x)
  # Features only (no labels), so using all of train here does not leak into the wd choice.
  eig = _covariance_eig(train_x, seed)
  fit = functools.partial(_fit, eigvals=eig[0], eigvecs=eig[1], tol=jnp.float32(tol),
                          steps=int(steps))
  params = (jnp.zeros((num_classes, d), jnp.float32), jnp.zeros((num_classes,), jnp.float32))

  n_val = int(round(val_fraction * n))
  val_top1, iterations = {}, {}
  best_wd = wds[0]
  if len(wds) > 1 and n_val > 0:
    if n_val >= n:
      raise ValueError(f"val_fraction={val_fraction} leaves no training examples (N={n})")
    is_val = np.zeros(n, np.float32)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = 1.0
    # 0/1 sample weights instead of slicing: every fit, refit included, shares one compilation.
    fit_w, val_w = jnp.asarray(1.0 - is_val), jnp.asarray(is_val)
    sweep_params = {}
    for wd in wds:
      params, iters = fit(train_x, train_y, fit_w, jnp.float32(wd), params)
      sweep_params[wd] = params
      val_top1[wd] = float(_accuracy(params, train_x, train_y, val_w))
      iterations[wd] = int(iters)
    best_wd = max(wds, key=lambda wd: (val_top1[wd], wd))
    params = sweep_params[best_wd]

  params, iters = fit(train_x, train_y, jnp.ones((n,), jnp.float32), jnp.float32(best_wd), params)
  iterations["refit"] = int(iters)
  top1 = float(_accuracy(params, test_x, test_y, jnp.ones((test_x.shape[0],), jnp.float32)))
  return {"top1": top1, "best_weight_decay": best_wd, "val_top1_by_wd": val_top1,
          "iterations": iterations}


# ---------------------------------------------------------------------------------------------
# k-NN.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("num_classes", "k", "batch_size"))
def _knn_predict(train_x, train_y, test_x, temperature, *, num_classes, k, batch_size):
  def normalize(a):
    return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

  train_x = normalize(train_x)
  train_onehot = jax.nn.one_hot(train_y, num_classes, dtype=jnp.float32)

  def predict(q):  # one query (D,); lax.map vmaps it over `batch_size` queries at a time
    sim = jnp.dot(train_x, normalize(q), precision=_HI)  # (N,) cosine similarities
    top_sim, top_idx = jax.lax.top_k(sim, k)
    # exp(sim / T) up to a common factor: subtracting the max cannot overflow or all-underflow.
    weight = jnp.exp((top_sim - top_sim[0]) / temperature)
    return jnp.argmax(jnp.dot(weight, train_onehot[top_idx], precision=_HI))

  return jax.lax.map(predict, test_x, batch_size=batch_size)  # memory: (batch_size, N)


def knn(train_x, train_y, test_x, test_y, *, num_classes: int, k: int = 20,
        temperature: float = 0.07, batch_size: int = 256) -> Dict[str, float]:
  """Weighted k-NN top-1, the InstDisc / DINO protocol for self-supervised features.

  Cosine similarity on L2-normalised features; the k most similar train points vote for their
  label with weight exp(sim / temperature); ties in the vote go to the lowest class id. Test
  points go through in batches of `batch_size`, so memory is (batch_size, n_train), not
  (n_test, n_train). Returns {"top1"} as a fraction.
  """
  train_x, train_y, test_x, test_y = _check_pair(train_x, train_y, test_x, test_y, num_classes)
  n = train_x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"k must be in [1, n_train={n}], got k={k}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  pred = _knn_predict(train_x, train_y, test_x, jnp.float32(temperature),
                      num_classes=int(num_classes), k=int(k),
                      batch_size=int(min(batch_size, test_x.shape[0])))
  return {"top1": float(jnp.mean((pred == test_y).astype(jnp.float32)))}
