"""Representation benchmark: one table, same probe protocol, same budget for every row.

  python -m soda_jax.tools.repr_benchmark --config=configs/demo.py --workdir=/tmp/repr_bench

Rows: raw pixels, a random-init encoder, SODA after the config's training budget, and ablations
at the same budget: global modulation, no layer masking, cosine schedule, target view = source
view (plain auto-encoding). `supervised` is a reference, not a method: the same encoder trained
with the labels (cross-entropy through a linear head) on as many images as SODA sees, to show
what this encoder can reach at this budget when its signal is not the bottleneck.

Each SODA row is a full `train_and_evaluate` in its own sub-directory, so an interrupted
benchmark resumes where it stopped; finished rows are merged into `workdir/repr_benchmark.json`
as they complete, so runs of separate `--rows` add up.
"""
import json
import os
import time
from typing import Dict, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root for one sub-directory per row.")
_ROWS = flags.DEFINE_list("rows", None, "Subset of rows (default: all).")
flags.mark_flags_as_required(["config", "workdir"])

# Ablation name -> config overrides (dotted keys).
ABLATIONS = {
    "soda": {},
    "global_modulation": {"model.modulation": "global"},
    "same_view": {"data.same_view": True},
    "no_layer_mask": {"diffusion.layer_mask_rate": 0.0},
    "cosine_schedule": {"diffusion.schedule": "cosine"},
}
ROWS = ("raw_pixels", "random_encoder") + tuple(ABLATIONS) + ("supervised",)


def train_supervised_encoder(config, images, labels, num_classes: int, mesh):
  """The config's encoder + a linear head, trained on labels with the config's optimiser.

  images (N, H, W, C) centre views, labels (N,): `num_train_steps` steps of `batch_size`,
  one shuffled pass after another (seeded). Returns (encoder variables, (first, last) loss).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from soda_jax import compile_once, sharding, train_step as ts  # pylint: disable=g-import-not-at-top

  class Classifier(nn.Module):
    encoder: nn.Module

    @nn.compact
    def __call__(self, x, train: bool):
      return nn.Dense(num_classes, name="head")(self.encoder(x, train=train))

  clf = Classifier(ts.build_model(config).encoder)
  # One init program at backend level 0, not op-by-op init (a threefry compile per leaf shape).
  variables = nn.meta.unbox(compile_once.init(clf, jax.random.PRNGKey(config.seed),
                                              x=images[:1], train=False))
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = ts.make_optimizer(config)  # SODA's optimiser and schedule, on {'encoder', 'head'}
  opt = tx.init(params)

  def step(params, stats, opt, x, y):
    def loss_fn(p):
      if stats:  # BatchNorm encoder (v1.5): batch statistics in train mode
        logits, new = clf.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
        new_stats = new["batch_stats"]
      else:
        logits, new_stats = clf.apply({"params": p}, x, train=True), stats
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss

  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step = jax.jit(step, in_shardings=(rep, rep, rep, data, data), out_shardings=rep,
                 donate_argnums=(0, 1, 2))
  params, stats, opt = jax.device_put((params, stats, opt), rep)
  rng = np.random.default_rng(config.seed)
  order, losses = np.zeros((0,), np.int64), []
  for _ in range(config.num_train_steps):
    if order.size < config.batch_size:
      order = np.concatenate([order, rng.permutation(images.shape[0])])
    idx, order = order[:config.batch_size], order[config.batch_size:]
    params, stats, opt, loss = step(params, stats, opt, jax.device_put(images[idx], data),
                                    jax.device_put(labels[idx], data))
    # One step in flight at a time: queuing many small sharded steps on the 8 fake CPU devices
    # deadlocked an all-reduce here (XLA "Termination timeout ... only 7 of 8 arrived"; cf.
    # jax-ml/jax#25861, CPU async dispatch). Costs nothing measurable at this size.
    losses.append(float(loss))  # the host read is the wait
  enc = {"params": params["encoder"], **({"batch_stats": stats["encoder"]} if stats else {})}
  return enc, (losses[0], float(np.mean(losses[-10:])))


def run(config, workdir: str, rows: Sequence[str] = ROWS) -> Dict[str, Dict[str, float]]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from soda_jax import config_base, config_checks, sharding, train, train_step as ts  # pylint: disable=g-import-not-at-top
  from soda_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from soda_jax.evaluate import probe, representation  # pylint: disable=g-import-not-at-top

  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise ValueError(f"--rows has unknown entries {unknown}; choose from {ROWS}")
  config_checks.check(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "repr_benchmark.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    logging.info("Keeping rows %s from %s (same workdir = same config, as for the checkpoints)",
                 sorted(results), path)

  def save(name, row):
    results[name] = row
    logging.info("%s: %s", name, row)
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)  # atomic: an interrupted write never loses earlier rows

  ev = config.evals
  if {"raw_pixels", "random_encoder", "supervised"} & set(rows):
    tr = pipeline.make_eval_arrays(config, config.data.split, ev.probe_train_examples)
    te = pipeline.make_eval_arrays(config, config.data.eval_split, ev.probe_test_examples)
    num_classes = int(max(tr["label"].max(), te["label"].max())) + 1
  if "raw_pixels" in rows:
    t0 = time.time()
    flat = lambda x: x.reshape(x.shape[0], -1).astype(np.float32)
    save("raw_pixels", {
        "probe_top1": probe.linear_probe(flat(tr["image"]), tr["label"], flat(te["image"]),
                                         te["label"], num_classes=num_classes)["top1"],
        "knn_top1": probe.knn(flat(tr["image"]), tr["label"], flat(te["image"]), te["label"],
                              num_classes=num_classes)["top1"],
        "wall_s": time.time() - t0})
  if "random_encoder" in rows:
    t0 = time.time()
    mesh = sharding.make_mesh(config)
    model, tx = ts.build_model(config), ts.make_optimizer(config)
    state, _, _ = ts.create_state(model, tx, config, mesh, jax.random.PRNGKey(config.seed))
    variables = state.eval_variables()
    bs = max(config.batch_size, 256)
    feats = [representation.extract_features(model, variables, a["image"], mesh, bs)
             for a in (tr, te)]
    save("random_encoder", dict(
        representation.probe_features(feats[0], tr["label"], feats[1], te["label"], num_classes),
        wall_s=time.time() - t0))
  if "supervised" in rows:
    t0 = time.time()
    mesh = sharding.make_mesh(config)
    # As many train images as SODA's steps see (fewer if the split is smaller), centre views.
    sup = pipeline.make_eval_arrays(config, config.data.split,
                                    config.batch_size * config.num_train_steps)
    enc_vars, (loss0, loss1) = train_supervised_encoder(config, sup["image"], sup["label"],
                                                        num_classes, mesh)
    encoder = ts.build_model(config).encoder
    encode = lambda v, x: (encoder.apply(v, x, train=False),)
    feats = [representation.map_batches(encode, enc_vars, a["image"], mesh, 256)[0]
             for a in (tr, te)]
    save("supervised", dict(
        probe_top1_h=probe.linear_probe(feats[0], tr["label"], feats[1], te["label"],
                                        num_classes=num_classes)["top1"],
        knn_top1_h=probe.knn(feats[0], tr["label"], feats[1], te["label"],
                             num_classes=num_classes)["top1"],
        train_loss_first=loss0, train_loss_last=loss1, train_examples=int(sup["image"].shape[0]),
        wall_s=time.time() - t0))
  for name, overrides in ABLATIONS.items():
    if name not in rows:
      continue
    t0 = time.time()
    out = train.train_and_evaluate(config_base.override(config, overrides),
                                    os.path.join(workdir, name))
    save(name, dict(out["eval"], wall_s=time.time() - t0))
  return {r: results[r] for r in ROWS if r in results}


def format_table(results) -> str:
  pct = lambda r, k: f"{100 * r[k]:.2f}" if k in r else "-"
  rows = ["| row | probe h | probe z | k-NN h | k-NN z | recon PSNR | wall s |",
          "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    if name == "raw_pixels":
      rows.append(f"| raw pixels | {pct(r, 'probe_top1')} | - | {pct(r, 'knn_top1')} | - | - | "
                  f"{r['wall_s']:.0f} |")
      continue
    psnr = f"{r['recon_psnr']:.2f}" if "recon_psnr" in r else "-"
    rows.append(f"| {name} | {pct(r, 'probe_top1_h')} | {pct(r, 'probe_top1_z')} | "
                f"{pct(r, 'knn_top1_h')} | {pct(r, 'knn_top1_z')} | {psnr} | {r['wall_s']:.0f} |")
  return "\n".join(rows)


def main(argv):
  del argv
  results = run(_CONFIG.value, _WORKDIR.value, tuple(_ROWS.value or ROWS))
  print(format_table(results))


if __name__ == "__main__":
  app.run(main)
