"""How much the decoder leans on z: denoiser x0-error with the true, shuffled and dropped latent.

On a fixed held-out two-view batch (source, target of the eval split; for 3-D configs K posed
source views of an unseen object and a target view from another camera) and fixed noise, at a
few noise levels t, the decoder's x0 estimate of the target is scored (MSE) three ways:
  true      z of each example's own source view
  shuffled  z of another example (rolled by one across the batch): wrong content, right marginals
  dropped   every sub-vector masked (the unconditional model that guidance uses)
If z carries what the target needs, true < dropped < shuffled, and the gap grows with t (at high
noise the target is hidden and only z can say what it was). `gain` = shuffled / true: 1 means the
decoder ignores z. Logged during training, it shows *when* the encoder starts to matter.
t = 1 is in the default set because x_t is then noise alone (alpha_bar clipped to 1e-5): the x0
estimate is the decoder's E[target | z, pose], where the DDIM sampler's first step starts. Small
objects on a plain background (the 3-D views) stay visible in x_t up to t ~ 0.999, so at t = 0.9
the decoder can score well without z.
"""
import functools
from typing import Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from soda_jax import config_base, diffusion, multihost
from soda_jax.data import pipeline
from soda_jax.models import soda

DEFAULT_TS = (0.5, 0.9, 1.0)


# What the model reads of a batch: 2-D views carry the target crop box, 3-D views the cameras'
# rays and which of the K source views count.
BATCH_KEYS = ("source", "target", "target_box", "source_rays", "target_rays", "source_mask")


def heldout_pair_batch(config: ml_collections.ConfigDict, num_examples: int,
                       seed: int = 1234) -> Dict[str, np.ndarray]:
  """num_examples examples from the eval split (source, target and their poses; numpy).

  The stream repeats the split once it is used up: with more examples than eval images
  (objects, for 3-D) the shuffled z can be an example's own, and `gain` reads low."""
  cfg = config_base.override(config, {"data.split": config.data.eval_split,
                                      "batch_size": int(num_examples)})
  batch = next(pipeline.make_train_iterator(cfg, seed=seed, process_index=0, process_count=1))
  return {k: batch[k] for k in BATCH_KEYS if k in batch}


def make_z_usage_fn(model: soda.SODA, config: ml_collections.ConfigDict,
                    batch: Dict[str, np.ndarray], ts: Sequence[float] = DEFAULT_TS,
                    seed: int = 0) -> Callable[..., Dict[str, float]]:
  """Compile once per run: returns fn(variables) -> {'z_usage/<way>_t<t>': x0-MSE, gain_t<t>}."""
  d = config.diffusion
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  b = batch["target"].shape[0]
  noise = jax.random.normal(jax.random.PRNGKey(seed), batch["target"].shape, jnp.float32)
  all_keep = jnp.ones((b, model.num_subvectors), bool)
  pose_keep = jnp.ones((b,), bool)

  ways = ("true", "shuffled", "dropped")

  @functools.partial(multihost.compile_then_meet, name="z_usage")
  @jax.jit
  def errors(variables):
    _, z = model.apply(variables, batch["source"], source_rays=batch.get("source_rays"),
                       source_mask=batch.get("source_mask"), method=soda.SODA.encode)
    # Every (t, way) pair, t-major: one decoder call per pair inside lax.map, so the program
    # holds the decoder once rather than len(ts) * 3 times (the unrolled loop compiled ~9
    # copies: 5-6 s per compile on 2 CPU cores, and as many copies of its code on a pod).
    z_way = {"true": z, "shuffled": jnp.roll(z, 1, axis=0), "dropped": z}
    keep_way = {"true": all_keep, "shuffled": all_keep, "dropped": ~all_keep}
    t_all = jnp.asarray([t for t in ts for _ in ways], jnp.float32)  # (T * 3,)
    z_all = jnp.stack([z_way[w] for _ in ts for w in ways])  # (T * 3, B, D)
    keep_all = jnp.stack([keep_way[w] for _ in ts for w in ways])  # (T * 3, B, S)

    def x0_error(args):
      t_val, zz, keep = args
      t = jnp.full((b,), t_val, jnp.float32)
      x_t = diffusion.q_sample(batch["target"], t, noise, d.schedule)
      pred = model.apply(variables, x_t, t, zz, keep, batch.get("target_box"), pose_keep,
                         target_rays=batch.get("target_rays"), method=soda.SODA.denoise)
      x0, _ = diffusion.to_x0_eps(pred, d.pred_type, x_t, t, d.schedule)
      return jnp.mean(jnp.square(x0 - batch["target"]))

    mse = jax.lax.map(x0_error, (t_all, z_all, keep_all))  # (T * 3,)
    return {f"z_usage/{w}_t{t:g}": mse[i * len(ways) + j]
            for i, t in enumerate(ts) for j, w in enumerate(ways)}

  def fn(variables) -> Dict[str, float]:
    out = {k: float(v) for k, v in jax.device_get(errors(variables)).items()}
    for t_val in ts:
      out[f"z_usage/gain_t{t_val:g}"] = (out[f"z_usage/shuffled_t{t_val:g}"]
                                         / out[f"z_usage/true_t{t_val:g}"])
    return out

  return fn
