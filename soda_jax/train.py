"""The SODA training run, top to bottom: mesh -> input -> model -> restore -> loop -> evals."""
import os
import signal
import threading
from typing import Any, Dict, Optional

from absl import logging
from clu import parameter_overview
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from soda_jax import checkpointing, config_checks, metric_writer, multihost, sharding
from soda_jax import train_step as ts
from soda_jax.data import pipeline
from soda_jax.data import sources
from soda_jax.evaluate import generate, nvs, representation, z_usage


class _Preemption:
  """SIGTERM -> finish the current step, save a checkpoint, return normally (exit code 0).

  One process: a Python SIGTERM handler sets a flag. Several processes: JAX's preemption sync
  service (started by `jax.distributed.initialize`) catches SIGTERM on whichever process gets
  it, and `ckpt.reached_preemption(step)` turns True on *every* process at the same step, so
  all save that step and stop together. (A Python handler there would replace JAX's.)
  """

  def __init__(self, ckpt: checkpointing.Checkpointer):
    self.requested = False
    self._ckpt = ckpt
    self._multi = jax.process_count() > 1
    self._old = None

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def check(self, step: int) -> bool:
    """Whether to stop after `step`; call once per step on every process."""
    if self._multi and not self.requested and self._ckpt.reached_preemption(step):
      logging.warning("Preemption agreed by all processes at step %d.", step)
      self.requested = True
    return self.requested

  def _handle(self, signum, frame):
    del frame
    logging.warning("Signal %d received: saving a checkpoint and exiting.", signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def enable_compilation_cache(setting: str) -> None:
  """Persistent XLA cache, so a rerun or a resumed run starts in seconds instead of compiling.

  'auto': $XDG_CACHE_HOME/soda_jax/xla (~/.cache/...) unless the process already set a cache
  directory (tests, a Colab); '': off; anything else: that directory.
  """
  if not setting or (setting == "auto" and jax.config.jax_compilation_cache_dir):
    return
  if setting == "auto":
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    setting = os.path.join(root, "soda_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", setting)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.info("Persistent compilation cache: %s", setting)


def _sample_grid(config, model, state, eval_batch, rng, step, workdir, writer):
  """Reconstructions of held-out source views (EMA params): TensorBoard + PNG in workdir.

  eval_batch: (global array split over the mesh, n) from `sharding.batch_from_host`."""
  variables = state.eval_variables()
  eval_source, n = eval_batch
  recon = generate.generate(model, variables, eval_source, rng, config.diffusion)
  # Global arrays may span processes: gather to host numpy (same on every process).
  source, recon = (multihost_utils.process_allgather(x, tiled=True)[:n]
                   for x in (eval_source, recon))
  grid = generate.image_grid([source, recon])
  if jax.process_index() == 0:
    path = generate.save_png(grid, os.path.join(workdir, "samples", f"recon_{step:07d}.png"))
    logging.info("Wrote %s", path)
  writer.write_images(step, {"reconstructions": grid[None]})
  return recon


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: Optional[int] = None) -> Dict[str, Any]:
  """Train (resuming from workdir if a checkpoint is there); return the final metrics.

  stop_after: pause at this step (checkpoint saved, no final evals) without changing the
  schedule; calling again with a larger value (or None) resumes. Learning curves use it.
  """
  # ---------------------------------------------------------------- validate + mesh
  config_checks.check(config, jax.device_count(), jax.process_count())
  enable_compilation_cache(config.compilation_cache_dir)
  multihost.share_cpu_compilation_cache(jax.config.jax_compilation_cache_dir or "")
  mesh = sharding.make_mesh(config)
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writer.create(workdir, jax.process_index())
  logging.info("Mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(),
               jax.devices()[0].device_kind)

  # ---------------------------------------------------------------- input
  train_iter = pipeline.make_train_iterator(
      config, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_batch = None
  if config.evals.num_samples > 0:
    eval_arrays = pipeline.make_eval_arrays(config, config.data.eval_split,
                                            config.evals.num_samples)
    # Every process decoded the same few images: one global array split over the mesh.
    eval_batch = sharding.batch_from_host(eval_arrays["image"], mesh)

  # ---------------------------------------------------------------- model + sharded state
  prog = ts.programs(config, mesh)  # built once per process for these programs
  model, abstract = prog.model, prog.abstract
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
  logging.info("%d param/opt leaves kept replicated (a dim not divisible by its mesh axes); "
               "%d under mesh.min_shard_elements=%d kept whole by choice.", prog.num_replicated,
               sharding.num_below(abstract, config.mesh.min_shard_elements),
               config.mesh.min_shard_elements)

  # ---------------------------------------------------------------- restore or init
  # Restore reads straight into the abstract, sharded target: no initialised copy is built
  # first. Damaged newest steps are skipped (warning); another config's checkpoint fails.
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                    async_save=config.async_checkpointing)
  start_step, state = ckpt.restore_latest(abstract, train_iter, config)
  if state is None:
    start_step = 0
    state = prog.init(init_rng)
  else:
    logging.info("Resumed from step %d in %s", start_step, ckpt.directory)
  if jax.process_index() == 0:
    # Stats (mean/std) would fetch every param to process 0, which fails once FSDP splits them
    # over processes: process 0 then does not hold them all.
    parameter_overview.log_parameter_overview(state.params,
                                              include_stats=jax.process_count() == 1)
  z_usage_fn = None
  if config.evals.z_usage_every_steps >= 0:
    z_usage_fn = z_usage.make_z_usage_fn(
        model, config, z_usage.heldout_pair_batch(config, config.evals.z_usage_examples))

  def log_z_usage(step):
    scalars = z_usage_fn(state.eval_variables())
    writer.write_scalars(step, scalars)
    logging.info("z usage at step %d: %s", step,
                 ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in sorted(scalars.items())))
    return scalars

  # ---------------------------------------------------------------- update fn
  step_fn = prog.step

  # ---------------------------------------------------------------- loop
  report = metric_writer.ProgressReport(config.num_train_steps, writer)
  pending = []  # device metrics since the last log step (no host sync in between)
  history, z_history = [], []
  step = start_step
  until = config.num_train_steps if stop_after is None else min(stop_after, config.num_train_steps)
  logging.info("Starting the training loop at step %d of %d.", step, config.num_train_steps)
  with _Preemption(ckpt) as preemption:
    while step < until:
      batch = pipeline.to_global_batch(next(train_iter), mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, batch, step_rng)
      pending.append(metrics)
      step += 1
      report(step)

      last = step == until
      stop = preemption.check(step)  # once per step: the same answer for every use below
      if step % config.log_every_steps == 0 or last or stop:
        host = jax.device_get(pending)
        summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        summary["skipped_records"] = float(pipeline.skipped_records(train_iter))
        writer.write_scalars(step, summary)
        history.append((step, summary))
        pending = []
        if not np.isfinite(summary["loss"]):
          raise FloatingPointError(f"loss is {summary['loss']} at step {step}")

      if step % config.checkpoint_every_steps == 0 or last or stop:
        ckpt.save(step, state, train_iter, config)

      # Periodic evals, never on a preemption step: its grace period is for the save.
      periodic = not last and not stop
      every = config.evals.samples_every_steps
      if eval_batch is not None and every > 0 and step % every == 0 and periodic:
        _sample_grid(config, model, state, eval_batch, sample_rng, step, workdir, writer)
      every = config.evals.z_usage_every_steps
      if z_usage_fn is not None and every > 0 and step % every == 0 and periodic:
        z_history.append((step, log_z_usage(step)))
      every = config.evals.probe_every_steps
      if every > 0 and step % every == 0 and periodic:
        writer.write_scalars(step, representation.evaluate(config, model, state, mesh))

      if stop:
        logging.warning("Stopping at step %d after preemption (checkpoint saved).", step)
        break

  # ---------------------------------------------------------------- final evals
  result = {"step": step, "history": history, "preempted": preemption.requested}
  finished = not preemption.requested and step == config.num_train_steps
  if z_usage_fn is not None and not preemption.requested:  # also at a stop_after pause
    z_history.append((step, log_z_usage(step)))
  result["z_usage"] = z_history
  if finished and eval_batch is not None:
    _sample_grid(config, model, state, eval_batch, sample_rng, step, workdir, writer)
  if finished and config.evals.probe_every_steps >= 0:
    result["eval"] = representation.evaluate(config, model, state, mesh)
    writer.write_scalars(step, result["eval"])
    if jax.process_index() == 0:
      print(f"\nSODA after {step} steps (frozen EMA encoder, {config.data.name}):\n"
            + representation.format_table(result["eval"]), flush=True)
  if finished and sources.is_multiview(config.data) and config.evals.nvs_objects > 0:
    result["nvs"] = nvs.evaluate(config, model, state.eval_variables(), workdir, step, writer,
                                 mesh=mesh)
  ckpt.close()
  writer.close()
  result["state"] = state
  return result
