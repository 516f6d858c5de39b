"""The only module that calls Orbax: train state + grain iterator state + config JSON.

A checkpoint directory `workdir/checkpoints/<step>/` holds three items:
  state/   the TrainState pytree (sharded arrays, restored straight into their shardings)
  data/    the grain iterator position, one JSON per process
  config/  the config as JSON, so a run can be inspected or re-created from the checkpoint alone
Orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never shows up as a step. A *complete* step can still be damaged afterwards (a truncated,
deleted or overwritten file): `restore_latest` then falls back to the newest intact step, with a
warning naming the damaged one, and moves the damaged steps to `workdir/checkpoints_damaged/`
(kept for inspection; left in place, the run would fail when it reaches their step numbers
again and Orbax refuses to overwrite them); `restore` of an explicitly requested step raises
`DamagedCheckpointError` instead. Whether a step is damaged is agreed by every process
(through the coordination service, not the collectives): each reads only its own shards.
Before reading any array, the saved config and the stored array shapes are compared with this
run's: a checkpoint written by another model config fails with `ConfigMismatchError` naming the
keys that differ.
"""
import functools
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from absl import flags, logging
from etils import epath
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from soda_jax import config_base, multihost

ITEMS = ("state", "data", "config")
# Config keys that decide the state's structure or meaning: a difference in any of them makes a
# checkpoint unusable even where the array shapes happen to agree.
STATE_KEYS = ("model.", "data.channels")


class CheckpointError(Exception):
  """A checkpoint cannot be used; the message says which and why (no traceback needed)."""


class DamagedCheckpointError(CheckpointError):
  pass


class ConfigMismatchError(CheckpointError):
  pass


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Handlers per item, so metadata can be read before any save/restore in this process."""
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, save, restore in (("state", ocp.args.StandardSave, ocp.args.StandardRestore),
                              ("config", ocp.args.JsonSave, ocp.args.JsonRestore),
                              ("data", grain.checkpoint.CheckpointSave,
                               grain.checkpoint.CheckpointRestore)):
    reg.add(item, save)
    reg.add(item, restore)
  return reg


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}."))
  return out


def config_diff(saved: dict, config: ml_collections.ConfigDict) -> Dict[str, Tuple[Any, Any]]:
  """{key: (value in the checkpoint, value now)} for every key whose JSON value differs."""
  now = _flatten(json.loads(json.dumps(config.to_dict())))
  old = _flatten(saved)
  return {k: (old.get(k, "<absent>"), now.get(k, "<absent>"))
          for k in sorted(set(old) | set(now)) if old.get(k, "<absent>") != now.get(k, "<absent>")}


@functools.lru_cache(maxsize=1)
def _schema_defaults() -> Dict[str, Any]:
  """Every config key's default (config_base.base_config), flattened as config_diff does."""
  return _flatten(json.loads(json.dumps(config_base.base_config().to_dict())))


def _shape_mismatches(stored: Any, abstract: Any) -> List[str]:
  """Paths whose stored shape differs from the target's (or that only one side has)."""
  def name(path):  # Orbax stores dataclasses/namedtuples as dicts: compare plain key names
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)

  def table(tree):
    return {name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "shape")}
  old, new = table(stored), table(abstract)
  return [f"{p}: stored {old.get(p, 'absent')}, expected {new.get(p, 'absent')}"
          for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]


def _all_ok(ok: bool, name: str) -> bool:
  """True only if `ok` on every process (each reads its own shards, so damage can be local).

  Through the coordination service's key-value store: a process whose read failed at once
  would wait at a collective for the others (still reading, or inside Orbax's restore
  barrier) longer than gloo's 30-s rendezvous allows."""
  return multihost.all_true(ok, f"checkpoint/{name}")


def _ignore_late_loop_callbacks() -> None:
  """Silence one known race: after a read fails, TensorStore completes the other reads of that
  restore on its own threads and their callbacks reach Orbax's already-closed event loop. Python
  prints each as an unraisable `RuntimeError: Event loop is closed` traceback, after the
  DamagedCheckpointError that says what happened. Every other unraisable goes to the old hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_soda_checkpointing", False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      logging.debug("Ignored a late TensorStore callback into a closed event loop.")
      return
    previous(unraisable)
  hook._soda_checkpointing = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


@functools.cache  # one registration per process, however many Checkpointers
def _save_arrays_whole_on_cpu() -> None:
  """On the CPU backend, save each array shard whole instead of split across its replicas.

  Orbax's default (replica-parallel saving) has each of R replicas copy 1/R of a shard to the
  host, which parallelises device-to-host transfers on accelerators. CPU "devices" already live
  in host memory, so there is nothing to parallelise, and every split costs one compiled slice
  program per array shape: 312 programs (17.7 s of compiling) at the tiny model's first save on
  an 8-device mesh (docs/benchmarks.md). The files are the same either way: restore does not
  care which replica wrote a chunk.
  """
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


@functools.cache
def _barriers_through_coordination_service() -> None:
  """With several processes, Orbax's barriers wait on JAX's coordination service (with Orbax's
  own barrier timeout), not on a psum over every device (its default). A value the user set for
  the flag (`--experimental_orbax_use_distributed_barrier=false`) is kept.

  The psum runs on the collectives backend, which on CPU is gloo: a peer that arrives more than
  30 s late fails the job (gloo's fixed timeout), and with async saves the psum is issued from
  Orbax's commit thread while the main thread's train steps issue their own collectives on the
  same devices. Both showed up in the 2-process CPU test (docs/benchmarks.md, issue 13).
  """
  flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
  if jax.process_count() > 1 and not flag.present:
    flag.parse("true")  # parse, not assign: readable even where absl never parsed argv


def steps_on_disk(workdir: str) -> List[int]:
  """The complete steps under workdir/checkpoints, oldest first, by listing the directory (no
  Orbax manager: cheap enough to poll while another process trains). A save in progress is a
  `<step>.orbax-checkpoint-tmp` directory and is not listed until Orbax renames it."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager`, always used with the `args=` API."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    _ignore_late_loop_callbacks()
    _save_arrays_whole_on_cpu()
    _barriers_through_coordination_service()
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), create=True,
            enable_async_checkpointing=async_save),
        handler_registry=_registry())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    """Every saved step, oldest first (export picks one by number)."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any,
           config: ml_collections.ConfigDict) -> bool:
    """Start saving `step` (async: returns once device arrays are copied to host)."""
    args = {"state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config.to_dict())}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any process got a preemption notice (SIGTERM).

    Multi-process runs only (JAX's preemption sync service); False in a single process.
    """
    return self._manager.reached_preemption(step)

  def _where(self, step: int) -> str:
    return f"Checkpoint step {step} in {self.directory}"

  def array_metadata(self, step: int) -> Any:
    """The saved state's tree of Orbax `ArrayMetadata`, read without any array data: each leaf's
    shape, dtype, the sharding it was saved with (`.sharding`: mesh shape, axis names,
    partition spec) and its stored chunk (`.storage.chunk_shape`, one device's shard)."""
    stored = self._manager.item_metadata(step)["state"]
    if stored is None:  # Orbax returns None, not an error, when state/_METADATA is missing
      raise DamagedCheckpointError(f"{self._where(step)} is damaged (no array metadata: "
                                   "state/_METADATA is missing or unreadable)")
    return getattr(stored, "tree", stored)

  def check_compatible(self, step: int, abstract_state: Any,
                       config: Optional[ml_collections.ConfigDict]) -> None:
    """Raise ConfigMismatchError if `step` was written by another model config or shapes."""
    try:
      saved = self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      stored = self.array_metadata(step)
    except DamagedCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f"{self._where(step)} is damaged ({type(e).__name__}: {_first_line(e)})") from e
    diff = config_diff(saved, config) if config is not None else {}
    # A key the checkpoint lacks was added to the schema after it was written; at its default
    # (which keeps the old behaviour) it is no difference, so upgrading does not orphan workdirs.
    added = {k for k, (old, now) in diff.items()
             if old == "<absent>" and _schema_defaults().get(k, "<absent>") == now}
    if added:
      logging.info("%s predates config keys %s; they are at their defaults", self._where(step),
                   sorted(added))
    key_diff = {k: v for k, v in diff.items() if k.startswith(STATE_KEYS) and k not in added}
    shapes = _shape_mismatches(stored, abstract_state)
    if key_diff or shapes:
      lines = [f"config.{k}: checkpoint has {a!r}, this run has {b!r}"
               for k, (a, b) in (key_diff or diff).items()]
      if shapes:
        lines.append(f"{len(shapes)} arrays differ in shape, e.g. " + "; ".join(shapes[:3]))
      raise ConfigMismatchError(
          f"{self._where(step)} was written with a different config:\n  " + "\n  ".join(lines)
          + "\nUse another --workdir, or the checkpoint's values for these keys.")

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None,
              config: Optional[ml_collections.ConfigDict] = None) -> Any:
    """Restore `step` into `abstract_state`'s shapes/dtypes/shardings; `data_iter` in place.

    abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (see
    `train_step.abstract_state`), so every array is read straight into its final sharding and
    no initialised copy of the state ever exists. Raises ConfigMismatchError /
    DamagedCheckpointError (one line) instead of Orbax's or TensorStore's errors.
    """
    if step not in self._manager.all_steps():
      raise CheckpointError(f"{self._where(step)} does not exist (steps: "
                            f"{sorted(self._manager.all_steps())})")
    error = None
    try:
      self.check_compatible(step, abstract_state, config)
    except DamagedCheckpointError as e:
      error = e
    if not _all_ok(error is None, f"compatible/{step}"):
      raise error or DamagedCheckpointError(
          f"{self._where(step)} is damaged (unreadable on another process)")
    if data_iter is not None:
      self._check_process_count(step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))["state"]
      jax.block_until_ready(restored)
    except Exception as e:  # pylint: disable=broad-except  (TensorStore/Orbax/JSON errors)
      error = e
    if not _all_ok(error is None, f"restore/{step}"):
      detail = (f"{type(error).__name__}: {_first_line(error)}" if error is not None
                else "unreadable on another process")
      raise DamagedCheckpointError(f"{self._where(step)} is damaged ({detail})") from error
    return restored

  def restore_latest(self, abstract_state: Any, data_iter: Any = None,
                     config: Optional[ml_collections.ConfigDict] = None
                     ) -> Tuple[Optional[int], Any]:
    """(step, state) of the newest intact checkpoint, or (None, None) if there is none.

    Damaged steps are skipped with a warning naming them; a config mismatch is raised (an older
    step of the same workdir would not match either).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iter, config)
      except DamagedCheckpointError as e:
        logging.warning("%s; falling back to an older checkpoint.", e)
        damaged.append(step)
        continue
      self._set_aside(damaged)
      return step, state
    if steps:
      raise DamagedCheckpointError(f"Every checkpoint in {self.directory} is damaged (steps "
                                   f"{sorted(steps)}); move them away to start afresh.")
    return None, None

  def _check_process_count(self, step: int) -> None:
    """The input pipeline's position is saved per process (`data/process_<i>-of-<n>.json`):
    resuming with another number of processes cannot restore it. Said plainly, instead of
    every step reading as damaged."""
    data_dir = epath.Path(self.directory) / str(step) / "data"
    n = jax.process_count()
    mine = data_dir / f"process_{jax.process_index()}-of-{n}.json"
    if not data_dir.exists() or mine.exists():
      return  # a missing item is the restore's to report (damage)
    counts = sorted({f.name.rsplit("-of-", 1)[-1].split(".")[0]
                     for f in data_dir.glob("process_*-of-*.json")})
    if counts and str(n) not in counts:
      raise CheckpointError(
          f"{self._where(step)} was written by {' or '.join(counts)} processes and this run "
          f"has {n}: the input pipeline's position is saved per process. Resume with "
          f"{counts[0]} processes, or start a new --workdir.")

  def _set_aside(self, steps: List[int]) -> None:
    """Move damaged steps to workdir/checkpoints_damaged/<step> (process 0; all wait)."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = epath.Path(self.directory).parent / "checkpoints_damaged"
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dst = aside / str(step)
        suffix = 1
        while dst.exists():  # damaged twice at the same step: keep both
          dst, suffix = aside / f"{step}.{suffix}", suffix + 1
        (epath.Path(self.directory) / str(step)).rename(dst)
        logging.warning("Moved the damaged checkpoint step %d to %s.", step, dst)
    multihost.barrier("checkpoint_set_aside")
    self._manager.reload()

  def restore_raw(self, step: int) -> Any:
    """The saved state as host numpy arrays, whatever devices wrote it (inspection, export,
    comparisons): e.g. a pod's or a 2-process run's checkpoint read on one machine.

    A numpy target built from the stored metadata; without one, Orbax restores jax arrays onto
    the devices that wrote them and refuses ("Topology mismatch") when those are not here.
    """
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), self.array_metadata(step))
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""
