"""Learning curve: probe accuracy (h, z), recon PSNR and z usage vs training step, over seeds.

  python -m soda_jax.tools.learning_curve --config=configs/demo.py --workdir=/tmp/lc \
      --seeds=0,1,2 --eval_steps=0,300,600 [--config.key=value ...]

For each seed one ordinary training run (`train.train_and_evaluate` in workdir/seed_<s>, its
schedule unchanged) is paused at every eval step (`stop_after`), evaluated with the run's own
protocol (`representation.evaluate`: frozen EMA encoder, linear probe + k-NN on h and z, recon
PSNR/SSIM) and resumed. Step 0 is that seed's random-init encoder, so every curve carries its own
random-init level, twice: with the initial BatchNorm statistics (mean 0, var 1), and with
statistics re-estimated on data (`bn_calibrated/...`, weights untouched), the fair reference for
"did training teach the encoder anything beyond calibrating its BatchNorm". Raw pixels are
probed once. Results go to workdir/learning_curve.json as each
point finishes (an interrupted run resumes from its checkpoints and keeps its points) and to
workdir/learning_curve.png: mean +- std over seeds, with the raw-pixel and random-init levels as
reference lines.
"""
import json
import os
from typing import Any, Dict, List, Sequence

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np


METRICS = ("probe_top1_h", "probe_top1_z", "knn_top1_h", "knn_top1_z", "recon_psnr",
           "recon_ssim")


def _save(path: str, results: Dict[str, Any]) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)  # atomic: an interrupted write never loses earlier points


def run(config, workdir: str, seeds: Sequence[int],
        eval_steps: Sequence[int]) -> Dict[str, Any]:
  """Train/evaluate every (seed, step); returns (and writes) the results dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from soda_jax import config_base, config_checks, sharding, train, train_step as ts  # pylint: disable=g-import-not-at-top
  from soda_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from soda_jax.evaluate import probe, representation  # pylint: disable=g-import-not-at-top

  n = config.num_train_steps
  bad = [s for s in eval_steps if not 0 <= s <= n]
  if bad:
    raise ValueError(f"--eval_steps {bad} outside [0, num_train_steps={n}]")
  if not seeds:
    raise ValueError("--seeds is empty")
  config_checks.check(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "learning_curve.json")
  results = {"config": json.loads(json.dumps(config.to_dict())), "seeds": list(seeds), "eval_steps": list(eval_steps),
             "curves": {}}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("config") != results["config"]:
      raise ValueError(f"{path} was written for another config: use a new --workdir")
    results["curves"] = old.get("curves", {})
    results["raw_pixels"] = old.get("raw_pixels")

  if results.get("raw_pixels") is None:
    ev = config.evals
    tr = pipeline.make_eval_arrays(config, config.data.split, ev.probe_train_examples)
    te = pipeline.make_eval_arrays(config, config.data.eval_split, ev.probe_test_examples)
    flat = lambda x: x.reshape(x.shape[0], -1).astype(np.float32)
    k = int(max(tr["label"].max(), te["label"].max())) + 1
    results["raw_pixels"] = {
        "probe_top1": probe.linear_probe(flat(tr["image"]), tr["label"], flat(te["image"]),
                                         te["label"], num_classes=k)["top1"],
        "knn_top1": probe.knn(flat(tr["image"]), tr["label"], flat(te["image"]), te["label"],
                              num_classes=k)["top1"]}
    _save(path, results)

  mesh = sharding.make_mesh(config)
  stopped = None
  for seed in seeds:
    cfg = config_base.override(config, {"seed": int(seed), "evals.probe_every_steps": -1})
    model = ts.build_model(cfg)
    curve = results["curves"].setdefault(str(seed), [])
    done = {p["step"] for p in curve}
    for step in sorted(set(eval_steps)):
      if step in done:
        continue
      out = train.train_and_evaluate(cfg, os.path.join(workdir, f"seed_{seed}"),
                                     stop_after=step)
      if out["preempted"] or out["step"] != step:  # SIGTERM: checkpoint saved, resume later
        stopped = {"seed": seed, "step": out["step"], "eval_step": step}
        logging.warning("Stopped at step %d before eval step %d: point not recorded.",
                        out["step"], step)
        break
      point = {"step": step, **representation.evaluate(cfg, model, out["state"], mesh)}
      if step == 0 and out["state"].batch_stats:  # the random init, BatchNorm calibrated too
        cal = representation.evaluate(cfg, model, out["state"], mesh, recon_examples=0,
                                      calibrate_bn=True)
        point.update({f"bn_calibrated/{k}": v for k, v in cal.items()})
      if out["z_usage"]:
        point.update(out["z_usage"][-1][1])
      curve.append(point)
      curve.sort(key=lambda p: p["step"])
      logging.info("seed %s step %d: %s", seed, step, point)
      _save(path, results)
    if stopped:
      break
  results["summary"] = summarize(results)
  _save(path, results)
  if results["summary"]:
    plot(results, os.path.join(workdir, "learning_curve.png"))
  if stopped:  # not saved: the next run of the same command resumes and records the rest
    results["stopped"] = stopped
  return results


def summarize(results: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Per eval step: mean and sample std over seeds of every metric (and the seed count)."""
  by_step: Dict[int, List[Dict[str, float]]] = {}
  for curve in results["curves"].values():
    for p in curve:
      by_step.setdefault(p["step"], []).append(p)
  out = []
  for step in sorted(by_step):
    pts = by_step[step]
    row = {"step": step, "num_seeds": len(pts)}
    for m in sorted({k for p in pts for k in p if k != "step"}):
      vals = np.array([p[m] for p in pts if m in p], np.float64)
      row[m] = float(vals.mean())
      row[m + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out.append(row)
  return out


def format_table(results: Dict[str, Any]) -> str:
  rows = ["| step | seeds | probe h | probe z | k-NN h | k-NN z | recon PSNR dB | z gain t=0.9 |",
          "|---|---|---|---|---|---|---|---|"]
  pm = lambda r, k, s=100: (f"{s * r[k]:.2f} +- {s * r[k + '_std']:.2f}" if k in r else "-")
  for r in results["summary"]:
    rows.append(f"| {r['step']} | {r['num_seeds']} | {pm(r, 'probe_top1_h')} | "
                f"{pm(r, 'probe_top1_z')} | {pm(r, 'knn_top1_h')} | {pm(r, 'knn_top1_z')} | "
                f"{pm(r, 'recon_psnr', 1)} | {pm(r, 'z_usage/gain_t0.9', 1)} |")
  first = results["summary"][0] if results["summary"] else {}
  if "bn_calibrated/probe_top1_h" in first:
    rows.append(f"| 0, BN calibrated | {first['num_seeds']} | "
                f"{pm(first, 'bn_calibrated/probe_top1_h')} | "
                f"{pm(first, 'bn_calibrated/probe_top1_z')} | "
                f"{pm(first, 'bn_calibrated/knn_top1_h')} | "
                f"{pm(first, 'bn_calibrated/knn_top1_z')} | - | - |")
  raw = results["raw_pixels"]
  rows.append(f"| raw pixels | - | {100 * raw['probe_top1']:.2f} | - | "
              f"{100 * raw['knn_top1']:.2f} | - | - | - |")
  return "\n".join(rows)


def plot(results: Dict[str, Any], path: str) -> str:
  """Probe accuracy (h, z) and recon PSNR vs step; raw-pixel and random-init reference lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = results["summary"]
  steps = np.array([r["step"] for r in summary])
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for key, label, colour in (("probe_top1_h", "probe h (pooled)", "C0"),
                             ("probe_top1_z", "probe z (bottleneck)", "C1")):
    mean = np.array([100 * r[key] for r in summary])
    std = np.array([100 * r[key + "_std"] for r in summary])
    ax.plot(steps, mean, "o-", color=colour, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
    if summary and summary[0]["step"] == 0:
      ax.axhline(mean[0], color=colour, ls=":", lw=1, label=f"random init ({label.split()[1]})")
      cal = summary[0].get("bn_calibrated/" + key)
      if cal is not None:
        ax.axhline(100 * cal, color=colour, ls="-.", lw=1,
                   label=f"random init, BN calibrated ({label.split()[1]})")
  ax.axhline(100 * results["raw_pixels"]["probe_top1"], color="k", ls="--", lw=1,
             label="raw pixels")
  ax.set(xlabel="training step", ylabel="linear probe top-1 (%)",
         title=f"{len(results['curves'])} seed(s), mean +- std")
  ax.legend(fontsize=8)
  psnr = [(r["step"], r["recon_psnr"], r["recon_psnr_std"]) for r in summary if "recon_psnr" in r]
  if psnr:
    s, m, e = map(np.array, zip(*psnr))
    ax2.errorbar(s, m, yerr=e, fmt="o-", color="C2")
  ax2.set(xlabel="training step", ylabel="recon PSNR (dB)", title="reconstruction (DDIM)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _define_flags():
  """CLI flags, defined only when run as a program (tests import several tools at once)."""
  config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Root: one sub-directory per seed + results.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
  flags.DEFINE_list("eval_steps", None,
                    "Steps to evaluate at (default: 0, half, end of the schedule).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  from soda_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.prepare_cpu(config)
  steps = ([int(s) for s in f.eval_steps] if f.eval_steps
           else [0, config.num_train_steps // 2, config.num_train_steps])
  results = run(config, f.workdir, [int(s) for s in f.seeds], steps)
  print(format_table(results))
  if "stopped" in results:
    s = results["stopped"]
    print(f"Stopped by a signal at step {s['step']} of seed {s['seed']}, before eval step "
          f"{s['eval_step']} (checkpoint saved): run the same command again to resume.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
