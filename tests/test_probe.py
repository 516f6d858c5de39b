"""Linear probe and k-NN on features whose answer is known: separable, pure noise, hand-worked."""
import jax.numpy as jnp
import numpy as np
import pytest

from soda_jax.evaluate import probe


def _rotated_onehot(n, num_classes, dim, seed, noise=0.1, scale=3.0):
  """Features that are a known linear function of the label (+ noise), in a random basis."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n)
  x = np.zeros((n, dim), np.float32)
  x[np.arange(n), y] = scale
  x += noise * rng.standard_normal((n, dim)).astype(np.float32)
  rotation, _ = np.linalg.qr(np.random.default_rng(123).standard_normal((dim, dim)))
  return (x @ rotation).astype(np.float32), y


def _noisy_classes(n, num_classes, dim, seed, sep=0.35):
  """Overlapping Gaussian classes: a probe with a real weight-decay trade-off."""
  rng = np.random.default_rng(seed)
  means = sep * np.random.default_rng(99).standard_normal((num_classes, dim))
  y = rng.integers(0, num_classes, n)
  return (means[y] + rng.standard_normal((n, dim))).astype(np.float32), y


def test_standardize_uses_train_statistics_only():
  rng = np.random.default_rng(0)
  train = rng.normal(3.0, 2.0, (500, 4)).astype(np.float32)
  test = rng.normal(-5.0, 0.1, (50, 4)).astype(np.float32)
  s_train, s_test = probe.standardize(train, test)
  np.testing.assert_allclose(np.mean(s_train, 0), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(s_train, 0), 1.0, atol=1e-5)
  expected = (test - train.mean(0)) / train.std(0)
  np.testing.assert_allclose(s_test, expected, rtol=1e-4, atol=1e-4)


def test_linear_probe_separable_features_reach_99_percent():
  x, y = _rotated_onehot(1200, num_classes=5, dim=32, seed=0)
  out = probe.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=5)
  assert out["top1"] >= 0.99
  assert set(out["val_top1_by_wd"]) == {0.0, 1e-4, 1e-3, 1e-2, 1e-1}
  assert out["val_top1_by_wd"][out["best_weight_decay"]] == max(out["val_top1_by_wd"].values())


def test_linear_probe_random_features_sit_at_chance():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4000, 16)).astype(np.float32)
  y = rng.integers(0, 4, 4000)
  out = probe.linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], num_classes=4)
  # Chance is 0.25; the test-set standard error is ~0.01.
  assert abs(out["top1"] - 0.25) < 0.04, out


def test_weight_decay_is_chosen_without_test_labels():
  x, y = _noisy_classes(1400, num_classes=4, dim=32, seed=2)
  tr_x, tr_y, te_x, te_y = x[:1000], y[:1000], x[1000:], y[1000:]
  a = probe.linear_probe(tr_x, tr_y, te_x, te_y, num_classes=4)
  shuffled = np.random.default_rng(0).permutation(te_y)
  b = probe.linear_probe(tr_x, tr_y, te_x, shuffled, num_classes=4)
  assert a["best_weight_decay"] == b["best_weight_decay"]
  assert a["val_top1_by_wd"] == b["val_top1_by_wd"]
  assert a["top1"] > b["top1"] + 0.2  # test labels do matter, but only for the reported top-1


@pytest.mark.parametrize("wd", [1e-3, 1e-1])
def test_linear_probe_solves_sklearns_objective(wd):
  """Same optimum as sklearn's multinomial L2 logistic regression with C = 1 / (wd * N)."""
  linear_model = pytest.importorskip("sklearn.linear_model")
  x, y = _noisy_classes(1400, num_classes=4, dim=32, seed=3)
  x = x @ np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)  # correlated
  tr_x, tr_y, te_x, te_y = x[:1000], y[:1000], x[1000:], y[1000:]
  s_tr, s_te = probe.standardize(tr_x, te_x)
  ref = linear_model.LogisticRegression(C=1.0 / (wd * len(tr_y)), tol=1e-10, max_iter=10000)
  ref.fit(np.asarray(s_tr), tr_y)

  eigvals, eigvecs = probe._covariance_eig(s_tr, seed=0)
  init = (jnp.zeros((4, 32)), jnp.zeros((4,)))
  (w, b), _ = probe._fit(s_tr, jnp.asarray(tr_y), jnp.ones((len(tr_y),)), jnp.float32(wd), init,
                         eigvals, eigvecs, jnp.float32(1e-5), steps=200)
  scale = np.abs(ref.coef_).max()
  np.testing.assert_allclose(w, ref.coef_, atol=3e-3 * scale)
  # The bias is only defined up to a shared shift (softmax); compare centred.
  np.testing.assert_allclose(b - np.mean(b), ref.intercept_ - ref.intercept_.mean(), atol=1e-3)

  out = probe.linear_probe(tr_x, tr_y, te_x, te_y, num_classes=4, weight_decays=(wd,))
  assert out["top1"] == pytest.approx(ref.score(np.asarray(s_te), te_y), abs=2 / len(te_y))
  assert out["val_top1_by_wd"] == {}  # one weight decay: nothing to select


def test_knn_on_a_copy_of_train_is_exact():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((300, 8)).astype(np.float32)
  y = rng.integers(0, 7, 300)
  assert probe.knn(x, y, x.copy(), y, num_classes=7, k=1, batch_size=64)["top1"] == 1.0


def test_knn_on_tight_clusters_is_exact_with_k20():
  x, y = _rotated_onehot(400, num_classes=5, dim=16, seed=5, noise=0.05)
  out = probe.knn(x[:300], y[:300], x[300:], y[300:], num_classes=5, k=20, batch_size=32)
  assert out["top1"] == 1.0


def test_knn_hand_worked_example_weights_votes_by_temperature():
  # q = [1, 0]: cosine 1 to a (class 0), 0.8 to b and c (class 1), -1 to d (class 0). With k=3
  # the vote is exp(1/T) for class 0 against 2 exp(0.8/T) for class 1: class 0 wins iff
  # T < 0.2 / ln 2 = 0.289. The scale of q and of the train points must not matter (cosine).
  train_x = np.array([[2.0, 0.0], [0.8, 0.6], [4.0, -3.0], [-1.0, 0.0]], np.float32)
  train_y = np.array([0, 1, 1, 0])
  test_x = np.array([[5.0, 0.0], [0.0, 1.0]], np.float32)
  # q = [0, 1]: cosines 0, 0.6, -0.6, 0 -> b (class 1) against a and d (class 0, both at 0):
  # exp(0.6/T) vs 2, so class 1 iff T < 0.6 / ln 2 = 0.866. Both answers flip between T's.
  def top1(labels, temperature):
    return probe.knn(train_x, train_y, test_x, np.array(labels), num_classes=2, k=3,
                     temperature=temperature)["top1"]

  assert top1([0, 1], temperature=0.07) == 1.0
  assert top1([0, 0], temperature=0.07) == 0.5
  assert top1([1, 0], temperature=1.0) == 1.0
  assert top1([0, 1], temperature=1.0) == 0.0


@pytest.mark.parametrize("fn", [probe.linear_probe, probe.knn])
def test_bad_inputs_raise_naming_the_argument(fn):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((30, 4)).astype(np.float32)
  y = rng.integers(0, 3, 30)
  with pytest.raises(ValueError, match=r"train_y must have shape \(30,\).*got \(29,\)"):
    fn(x, y[:29], x, y, num_classes=3)
  with pytest.raises(ValueError,
                     match=r"test_y must lie in \[0, num_classes=3\), got test_y\[2\] = 3"):
    fn(x, y, x, np.where(np.arange(30) == 2, 3, y), num_classes=3)
  with pytest.raises(ValueError, match=r"train_y must lie .* got train_y\[0\] = -1"):
    fn(x, np.where(np.arange(30) == 0, -1, y), x, y, num_classes=3)
  bad = x.copy()
  bad[5, 1] = np.nan
  with pytest.raises(ValueError, match=r"test_x has 1 non-finite values, e.g. test_x\[5, 1\]"):
    fn(x, y, bad, y, num_classes=3)
  with pytest.raises(ValueError, match=r"train_x and test_x must have the same feature dim"):
    fn(x, y, x[:, :3], y, num_classes=3)


def test_knn_rejects_k_larger_than_train():
  x = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match=r"k must be in \[1, n_train=4\], got k=5"):
    probe.knn(x, np.arange(4), x, np.arange(4), num_classes=4, k=5)
