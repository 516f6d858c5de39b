"""Frozen-encoder evaluation of a trained state: features -> linear probe + k-NN; recon PSNR.

Features come from the EMA encoder (what SODA reports), computed in sharded batches over the
whole mesh. Both the pooled features h and the bottleneck z are probed.
"""
import functools
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from soda_jax import multihost, sharding
from soda_jax.data import pipeline
from soda_jax.evaluate import generate, metrics, probe
from soda_jax.models import soda


def map_batches(fn, variables, images: np.ndarray, mesh, batch_size: int) -> Tuple[np.ndarray, ...]:
  """fn(variables, images (b, ...)) -> tuple of (b, ...) arrays, over all images as numpy.

  Batches are split over the whole mesh; the last partial batch is padded (and the padding
  dropped) so one compiled shape serves all.
  """
  n = images.shape[0]
  batch_size = max(mesh.size, (batch_size // mesh.size) * mesh.size)
  fn = multihost.compile_then_meet(
      jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
              out_shardings=sharding.replicated(mesh)), "map_batches")
  # Replicated by a jitted identity (an all-gather of the FSDP shards inside one compiled
  # program), not `jax.device_put`: its cross-process reshard deadlocked in the 2-process test.
  variables = multihost.compile_then_meet(
      jax.jit(lambda v: v, out_shardings=sharding.replicated(mesh)), "replicate")(variables)
  outs = []
  for i in range(0, n, batch_size):
    chunk, m = sharding.batch_from_host(images[i:i + batch_size], mesh, rows=batch_size)
    outs.append([np.asarray(o)[:m] for o in fn(variables, chunk)])
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def extract_features(model: soda.SODA, variables, images: np.ndarray, mesh,
                     batch_size: int) -> Dict[str, np.ndarray]:
  """images (N, H, W, C) in [-1, 1] -> {'h': (N, F), 'z': (N, latent_dim)} as float32 numpy."""
  h, z = map_batches(functools.partial(model.apply, method=soda.SODA.encode), variables, images,
                     mesh, batch_size)
  return {"h": h.astype(np.float32), "z": z.astype(np.float32)}


def calibrate_batch_stats(model: soda.SODA, variables, images: np.ndarray,
                          batch_size: int = 256, passes: int = 1) -> Dict[str, Any]:
  """The encoder's BatchNorm statistics re-estimated on `images`, weights unchanged.

  A random-init encoder evaluated with its *initial* statistics (mean 0, var 1) is an
  unnormalised net whose probe accuracy swings by points from one init to another; a trained one
  has statistics of real data. Comparing a trained encoder with a calibrated random one keeps
  "learning" from being credited with what is only BatchNorm calibration. Runs the encoder in
  train mode (running averages, momentum as configured) over `passes` of the images in order.
  Returns variables with the new 'batch_stats' ({} encoders without BatchNorm: unchanged).
  """
  if "batch_stats" not in variables:
    return variables

  @jax.jit
  def update(v, x):
    _, new = model.apply(v, x, train=True, method=soda.SODA.encode, mutable=["batch_stats"])
    return {**v, "batch_stats": new["batch_stats"]}

  for _ in range(passes):
    for i in range(0, images.shape[0] - batch_size + 1, batch_size):
      variables = update(variables, images[i:i + batch_size])
  return variables


def probe_features(train_feats, train_y, test_feats, test_y, num_classes) -> Dict[str, float]:
  out = {}
  for name in ("h", "z"):
    out[f"probe_top1_{name}"] = probe.linear_probe(
        train_feats[name], train_y, test_feats[name], test_y, num_classes=num_classes)["top1"]
    out[f"knn_top1_{name}"] = probe.knn(
        train_feats[name], train_y, test_feats[name], test_y, num_classes=num_classes)["top1"]
  return out


def evaluate(config: ml_collections.ConfigDict, model: soda.SODA, state, mesh,
             rng: Optional[jax.Array] = None, recon_examples: int = 64,
             calibrate_bn: bool = False) -> Dict[str, float]:
  """Linear probe + k-NN on h and z (EMA encoder), and reconstruction PSNR/SSIM.

  calibrate_bn: first re-estimate the BatchNorm statistics on the probe's train images
  (`calibrate_batch_stats`); for the random-init reference level.
  """
  t0 = time.time()
  ev = config.evals
  train = pipeline.make_eval_arrays(config, config.data.split, ev.probe_train_examples)
  test = pipeline.make_eval_arrays(config, config.data.eval_split, ev.probe_test_examples)
  num_classes = int(max(train["label"].max(), test["label"].max())) + 1
  variables = state.eval_variables()
  if calibrate_bn:
    variables = calibrate_batch_stats(model, variables, train["image"])
  bs = max(config.batch_size, 256)
  train_f = extract_features(model, variables, train["image"], mesh, bs)
  test_f = extract_features(model, variables, test["image"], mesh, bs)
  # Every process holds the same (replicated) features: fitted once, numbers sent to the rest.
  out = multihost.computed_on_process_0(functools.partial(
      probe_features, train_f, train["label"], test_f, test["label"], num_classes), "probe")
  if recon_examples:
    # Same images on every process -> one global array split over the mesh (works across
    # processes); rows >= n are padding.
    src, n = sharding.batch_from_host(test["image"][:recon_examples], mesh)
    recon = generate.generate(model, variables, src,
                              jax.random.PRNGKey(0) if rng is None else rng, config.diffusion)
    out["recon_psnr"] = float(jnp.mean(metrics.psnr(recon, src, data_range=2.0)[:n]))
    out["recon_ssim"] = float(jnp.mean(metrics.ssim(recon, src, data_range=2.0)[:n]))
  logging.info("Representation eval took %.1fs: %s", time.time() - t0, out)
  return out


def format_table(results: Dict[str, float]) -> str:
  rows = ["| metric | h (pooled) | z (bottleneck) |", "|---|---|---|"]
  for m in ("probe_top1", "knn_top1"):
    if f"{m}_h" in results:
      rows.append(f"| {m} | {100 * results[f'{m}_h']:.2f}% | {100 * results[f'{m}_z']:.2f}% |")
  if "recon_psnr" in results:
    rows.append(f"| reconstruction PSNR / SSIM | {results['recon_psnr']:.2f} dB | "
                f"{results['recon_ssim']:.3f} |")
  return "\n".join(rows)
