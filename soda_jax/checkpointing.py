"""The only module that calls Orbax: train state + grain iterator state + config JSON.

A checkpoint directory `workdir/checkpoints/<step>/` holds three items:
  state/   the TrainState pytree (sharded arrays, restored straight into their shardings)
  data/    the grain iterator position, one JSON per process
  config/  the config as JSON, so a run can be inspected or re-created from the checkpoint alone
Orbax writes each step to a temporary directory and renames it when complete, so the newest
*complete* checkpoint is what `latest_step` returns after a crash or preemption.
"""
import os
from typing import Any, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager`, always used with the `args=` API."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any,
           config: ml_collections.ConfigDict) -> bool:
    """Start saving `step` (async: returns once device arrays are copied to host)."""
    args = {"state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config.to_dict())}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restore `step` into `abstract_state`'s shapes/dtypes/shardings; `data_iter` in place.

    abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set, so every array is
    read straight into its final sharding (no host round trip of the full state).
    """
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def restore_raw(self, step: int) -> Any:
    """The saved state as host numpy arrays, without a target (inspection, comparisons)."""
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    """Block until async saves are on disk (before exit, and in tests)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
