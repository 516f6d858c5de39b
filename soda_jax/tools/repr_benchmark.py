"""Representation benchmark: one table, same probe protocol, same budget for every row.

  python -m soda_jax.tools.repr_benchmark --config=configs/demo.py --workdir=/tmp/repr_bench

Rows: raw pixels, a random-init encoder, SODA after the config's training budget, and ablations
at the same budget: global modulation, no layer masking, cosine schedule, target view = source
view (plain auto-encoding). Each training row is a full `train_and_evaluate` in its own
sub-directory, so an interrupted benchmark resumes where it stopped; finished rows are merged
into `workdir/repr_benchmark.json` as they complete, so runs of separate `--rows` add up.
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
ROWS = ("raw_pixels", "random_encoder") + tuple(ABLATIONS)


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
  if "raw_pixels" in rows or "random_encoder" in rows:
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
    variables = representation.eval_variables(state)
    bs = max(config.batch_size, 256)
    feats = [representation.extract_features(model, variables, a["image"], mesh, bs)
             for a in (tr, te)]
    save("random_encoder", dict(
        representation.probe_features(feats[0], tr["label"], feats[1], te["label"], num_classes),
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
