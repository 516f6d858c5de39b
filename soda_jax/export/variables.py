"""What every exporter starts from: a checkpoint's eval variables, and their flat dotted names.

`from_checkpoint` reads one step of a workdir as host numpy arrays (no model init, nothing
compiled) and checks them against the shapes the config's model would create, so a config that
does not match the checkpoint fails with the names that differ. The variables are what
`model.apply` takes: {'params': {'encoder', 'head', 'decoder'}, 'batch_stats': {'encoder'}}
(no 'batch_stats' for GroupNorm encoders), with the EMA params unless `online=True`, paired
with the one set of BatchNorm statistics the checkpoint holds (as evaluation pairs them).

Flat names join the path with dots: ('params', 'encoder', 'layer1_0', 'conv1', 'kernel') ->
'params.encoder.layer1_0.conv1.kernel'. Flax module names never contain dots, so the mapping is
one-to-one; `flatten` checks that.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from soda_jax import checkpointing
from soda_jax.models import soda

Variables = Dict[str, Any]


def flatten(variables: Mapping[str, Any]) -> Dict[str, Any]:
  """Nested dicts -> {'params.encoder.conv1.kernel': array, ...} (insertion order kept)."""
  flat = {}
  for path, value in traverse_util.flatten_dict(dict(variables)).items():
    bad = [p for p in path if not isinstance(p, str) or "." in p or not p]
    if bad:
      raise ValueError(f"variable path {path!r}: part {bad[0]!r} cannot be written as a dotted "
                       f"name")
    flat[".".join(path)] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Variables:
  return traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})


def subset(variables: Mapping[str, Any], params: Tuple[str, ...]) -> Variables:
  """Only the named top-level params (e.g. ('encoder', 'head')), with batch_stats if any."""
  out = {"params": {k: variables["params"][k] for k in params}}
  if "batch_stats" in variables and any(k in variables["batch_stats"] for k in params):
    out["batch_stats"] = {k: v for k, v in variables["batch_stats"].items() if k in params}
  return out


def build_model(config: ml_collections.ConfigDict) -> soda.SODA:
  """The model in float32 compute: exports are references, whatever dtype training ran in."""
  return soda.build_model(config.model, image_channels=config.data.channels, dtype=jnp.float32)


def abstract_variables(model: soda.SODA, config: ml_collections.ConfigDict) -> Variables:
  """The shapes/dtypes `model.init` gives for this config, traced only (nothing compiled)."""
  inputs = soda.init_inputs(1, config.data.image_size, config.data.channels,
                            model.num_subvectors)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))
  abstract = nn.meta.unbox(abstract)
  return {k: v for k, v in abstract.items() if k in ("params", "batch_stats") and v}


def check_matches(variables: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
  """Raise ValueError naming every missing, unexpected or mis-shaped variable of `what`."""
  got, want = flatten(variables), flatten(expected)
  errs = [f"missing {k} {tuple(want[k].shape)}" for k in want if k not in got]
  errs += [f"unexpected {k} {tuple(np.shape(got[k]))}" for k in got if k not in want]
  errs += [f"{k}: shape {tuple(np.shape(got[k]))} {np.asarray(got[k]).dtype}, the model has "
           f"{tuple(want[k].shape)} {want[k].dtype}"
           for k in want if k in got and (tuple(np.shape(got[k])) != tuple(want[k].shape)
                                          or np.asarray(got[k]).dtype != want[k].dtype)]
  if errs:
    more = f" (and {len(errs) - 8} more)" if len(errs) > 8 else ""
    raise ValueError(f"{what} does not match the config's model: " + "; ".join(errs[:8]) + more)


def checkpoint_step(workdir: str, step: Optional[int]) -> int:
  """The step to export (newest if None); ValueError naming the bad step and the ones there."""
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    steps = sorted(ckpt.all_steps())
  finally:
    ckpt.close()
  if not steps:
    raise ValueError(f"no checkpoint in {ckpt.directory}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"--step={step} is not a checkpoint in {ckpt.directory} (steps: {steps})")
  return step


def from_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None,
                    online: bool = False) -> Tuple[Variables, int]:
  """(eval variables as numpy, step) of `workdir`'s checkpoint `step` (default: newest)."""
  step = checkpoint_step(workdir, step)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    raw = ckpt.restore_raw(step)
  finally:
    ckpt.close()
  # EMA params go with the EMA of the BatchNorm statistics (train_step.TrainState).
  variables = {"params": raw["params" if online else "ema_params"]}
  stats = raw.get("batch_stats" if online else "ema_batch_stats")
  if stats:
    variables["batch_stats"] = stats
  variables = jax.tree.map(np.asarray, variables)
  check_matches(variables, abstract_variables(build_model(config), config),
                f"checkpoint step {step} in {workdir}")
  return variables, step
