"""Validate a config once, up front, before anything compiles.

Every problem found is reported in one ValueError, each line naming the key and its bad value.
"""
import math
from typing import List, Optional

import ml_collections

ENCODER_DEPTHS = (18, 34, 50)
ENCODER_VERSIONS = ("v1.5", "v2")
ENCODER_STEMS = ("imagenet", "cifar")
COMPUTE_DTYPES = ("float32", "bfloat16")
MESH_AXES = ("data", "fsdp")


class ConfigError(ValueError):
  """An invalid config; the message lists every problem (entry points print it, no traceback)."""


def non_finite_errors(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  """Every float in the config (also inside tuples) must be finite: nan/inf never make sense."""
  errs = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      errs += non_finite_errors(value, name + ".")
      continue
    values = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      errs.append(f"config.{name}={value!r} is not finite")
  return errs


def _one_of(errs, key, value, allowed):
  if value not in allowed:
    errs.append(f"config.{key}={value!r} is not one of {tuple(allowed)}")


def _in_range(errs, key, value, lo, hi, hi_open=False):
  ok = isinstance(value, (int, float)) and lo <= value and (value < hi if hi_open else value <= hi)
  if not ok:
    errs.append(f"config.{key}={value!r} must be in [{lo}, {hi}{')' if hi_open else ']'}")


def model_errors(model: ml_collections.ConfigDict, image_size: Optional[int] = None) -> List[str]:
  """Problems with `config.model` (and its fit to `image_size`, if given)."""
  from soda_jax.models import soda  # pylint: disable=g-import-not-at-top
  errs = []
  enc, dec = model.encoder, model.decoder
  _one_of(errs, "model.encoder.depth", enc.depth, ENCODER_DEPTHS)
  _one_of(errs, "model.encoder.version", enc.version, ENCODER_VERSIONS)
  _one_of(errs, "model.encoder.stem", enc.stem, ENCODER_STEMS)
  if not isinstance(enc.width, int) or enc.width < 1:
    errs.append(f"config.model.encoder.width={enc.width!r} must be a positive int")
  elif enc.version == "v2":
    expansion = 4 if enc.depth == 50 else 1
    for c in sorted({enc.width * m * e for m in (1, 2, 4, 8) for e in (1, expansion)}):
      if c % enc.num_groups:
        errs.append(f"config.model.encoder.num_groups={enc.num_groups} does not divide the "
                    f"encoder's {c} channels (width={enc.width})")
        break
  _one_of(errs, "model.modulation", model.modulation, soda.MODULATIONS)
  _one_of(errs, "model.pose", model.pose, soda.POSES)
  _one_of(errs, "model.latent_init", model.latent_init, soda.LATENT_INITS)
  _one_of(errs, "model.latent_act", model.latent_act, soda.LATENT_ACTS)

  mult = tuple(dec.channel_mult)
  if not mult or not all(isinstance(m, int) and m > 0 for m in mult):
    errs.append(f"config.model.decoder.channel_mult={mult!r} must be a non-empty tuple of "
                "positive ints")
    return errs
  if dec.base_channels < 1:
    errs.append(f"config.model.decoder.base_channels={dec.base_channels} must be positive")
  for c in sorted({dec.base_channels * m for m in mult} | {dec.base_channels}):
    if c % dec.num_groups:
      errs.append(f"config.model.decoder.num_groups={dec.num_groups} does not divide the "
                  f"decoder's {c} channels (base_channels={dec.base_channels}, "
                  f"channel_mult={mult})")
      break
  if not isinstance(dec.num_res_blocks, int) or dec.num_res_blocks < 1:
    errs.append(f"config.model.decoder.num_res_blocks={dec.num_res_blocks!r} must be >= 1")
  _in_range(errs, "model.decoder.dropout", dec.dropout, 0.0, 1.0, hi_open=True)

  n_sub = soda.num_subvectors(model.modulation if model.modulation in soda.MODULATIONS
                              else "layer", len(mult))
  if not isinstance(model.latent_dim, int) or model.latent_dim < n_sub:
    errs.append(f"config.model.latent_dim={model.latent_dim!r} is smaller than the number of "
                f"sub-vectors ({n_sub} = {len(mult)} UNet levels + 1 middle)")

  if image_size is not None:
    from soda_jax.models.unet import level_sizes  # pylint: disable=g-import-not-at-top
    sizes = level_sizes(image_size, len(mult))
    for r in dec.attention_resolutions:
      if r not in sizes:
        errs.append(f"config.model.decoder.attention_resolutions contains {r}, which is not a "
                    f"level size for image_size={image_size} (levels: {sizes})")
    for i, s in enumerate(sizes):
      if s in dec.attention_resolutions:
        c = dec.base_channels * mult[i]
        heads = dec.num_heads or max(1, c // dec.head_dim)
        if c % heads:
          errs.append(f"config.model.decoder.num_heads={heads} does not divide {c} channels at "
                      f"level {i}")
    if sizes[-1] < 2:
      errs.append(f"config.data.image_size={image_size} is too small for "
                  f"{len(mult)} UNet levels (smallest level would be {sizes[-1]}x{sizes[-1]})")
  return errs


def diffusion_errors(d: ml_collections.ConfigDict) -> List[str]:
  from soda_jax import diffusion  # pylint: disable=g-import-not-at-top
  errs = []
  _one_of(errs, "diffusion.schedule", d.schedule, diffusion.SCHEDULES)
  _one_of(errs, "diffusion.pred_type", d.pred_type, diffusion.PRED_TYPES)
  _one_of(errs, "diffusion.loss_weighting", d.loss_weighting, diffusion.WEIGHTINGS)
  for k in ("layer_mask_rate", "latent_drop_rate", "pose_drop_rate"):
    _in_range(errs, f"diffusion.{k}", d[k], 0.0, 1.0)
  if isinstance(d.t_power, bool) or not isinstance(d.t_power, (int, float)) or not d.t_power > 0:
    errs.append(f"config.diffusion.t_power={d.t_power!r} must be a number > 0")
  if not isinstance(d.sample_steps, int) or d.sample_steps < 1:
    errs.append(f"config.diffusion.sample_steps={d.sample_steps!r} must be an int >= 1")
  if d.eta < 0:
    errs.append(f"config.diffusion.eta={d.eta!r} must be >= 0")
  clip = d.get("clip_x0")
  if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                           or not clip > 0):
    errs.append(f"config.diffusion.clip_x0={clip!r} must be a number > 0 or None")
  return errs


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int):
  """Resolve the -1 in config.mesh.shape; None if it cannot be resolved."""
  shape = list(config.mesh.shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    return None
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      return None
    shape[shape.index(-1)] = num_devices // known
  return tuple(shape) if math.prod(shape) == num_devices else None


def training_errors(config: ml_collections.ConfigDict, num_devices: int,
                    process_count: int = 1) -> List[str]:
  from soda_jax.data import sources  # pylint: disable=g-import-not-at-top
  errs = []
  _one_of(errs, "compute_dtype", config.compute_dtype, COMPUTE_DTYPES)
  if tuple(config.mesh.axes) != MESH_AXES:
    errs.append(f"config.mesh.axes={tuple(config.mesh.axes)!r} must be {MESH_AXES}")
  if len(config.mesh.shape) != 2 or mesh_shape(config, num_devices) is None:
    errs.append(f"config.mesh.shape={tuple(config.mesh.shape)!r} does not fit {num_devices} "
                "devices (product must equal the device count; at most one -1)")
  floor = config.mesh.min_shard_elements
  if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
    errs.append(f"config.mesh.min_shard_elements={floor!r} must be an int >= 0")
  if not isinstance(config.batch_size, int) or config.batch_size < 1:
    errs.append(f"config.batch_size={config.batch_size!r} must be a positive int")
  elif config.batch_size % num_devices:
    errs.append(f"config.batch_size={config.batch_size} is not divisible by the "
                f"{num_devices} devices")
  elif config.batch_size % process_count:
    errs.append(f"config.batch_size={config.batch_size} is not divisible by the "
                f"{process_count} processes")
  for k in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if not isinstance(config[k], int) or config[k] < 1:
      errs.append(f"config.{k}={config[k]!r} must be a positive int")
  ev = config.evals
  if not isinstance(ev.z_usage_every_steps, int) or ev.z_usage_every_steps < -1:
    errs.append(f"config.evals.z_usage_every_steps={ev.z_usage_every_steps!r} must be an int "
                ">= -1 (-1 = never, 0 = at the end)")
  if not isinstance(ev.z_usage_examples, int) or ev.z_usage_examples < 2:
    errs.append(f"config.evals.z_usage_examples={ev.z_usage_examples!r} must be an int >= 2 "
                "(shuffling z needs two examples)")
  o = config.optim
  for k in ("lr", "weight_decay", "grad_clip", "encoder_lr_mult"):
    if not isinstance(o[k], (int, float)) or o[k] < 0:
      errs.append(f"config.optim.{k}={o[k]!r} must be a number >= 0")
  _in_range(errs, "optim.ema_decay", o.ema_decay, 0.0, 1.0)
  _one_of(errs, "optim.lr_schedule", o.lr_schedule, ("cosine", "constant"))
  errs += sources.config_errors(config.data)
  return errs


def multiview_errors(config: ml_collections.ConfigDict) -> List[str]:
  """3-D views: the dataset, the model's pose (camera rays) and the evaluations must agree."""
  from soda_jax.data import sources  # pylint: disable=g-import-not-at-top
  errs = []
  f = config.model.get("ray_freqs")
  if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= 16:
    errs.append(f"config.model.ray_freqs={f!r} must be an int in [0, 16]")
  if "data" not in config:
    return errs
  name, pose = config.data.name, config.model.pose
  multiview = sources.is_multiview(config.data)
  if multiview and pose != "rays":
    errs.append(f"config.model.pose={pose!r} must be 'rays' for the multi-view dataset "
                f"config.data.name={name!r} (the decoder needs the target camera)")
  if pose == "rays" and not multiview:
    errs.append(f"config.model.pose='rays' needs a multi-view dataset (config.data.name one of "
                f"{sources.MULTIVIEW_NAMES}), not config.data.name={name!r}")
  if not multiview or "evals" not in config:
    return errs
  ev = config.evals
  for key, need in (("num_samples", 0), ("probe_every_steps", -1)):
    if ev[key] != need:
      errs.append(f"config.evals.{key}={ev[key]!r} must be {need} for the multi-view dataset "
                  f"config.data.name={name!r}: a 2-D evaluation (the NVS evaluation, "
                  "config.evals.nvs_*, replaces it)")
  if isinstance(ev.nvs_objects, bool) or not isinstance(ev.nvs_objects, int) or ev.nvs_objects < 0:
    errs.append(f"config.evals.nvs_objects={ev.nvs_objects!r} must be an int >= 0 (0 = no NVS "
                "evaluation)")
  ks = tuple(ev.nvs_source_views)
  if not ks or not all(isinstance(k, int) and 1 <= k <= sources.MAX_SOURCE_VIEWS for k in ks):
    errs.append(f"config.evals.nvs_source_views={ks!r} must be a non-empty tuple of ints in "
                f"[1, {sources.MAX_SOURCE_VIEWS}]")
  for key in ("nvs_turntable", "nvs_grid_objects", "nvs_seed"):
    if isinstance(ev[key], bool) or not isinstance(ev[key], int) or ev[key] < 0:
      errs.append(f"config.evals.{key}={ev[key]!r} must be an int >= 0")
  return errs


def check(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
          process_count: int = 1) -> None:
  """Raise one ConfigError listing every problem; `num_devices=None` skips the training checks."""
  errs = non_finite_errors(config)
  errs += model_errors(config.model, config.data.image_size if "data" in config else None)
  errs += diffusion_errors(config.diffusion)
  errs += multiview_errors(config)
  if num_devices is not None:
    errs += training_errors(config, num_devices, process_count)
  if errs:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(errs))
