"""`encode` and `denoise` as serialized StableHLO (`jax.export`), batch dimension symbolic.

Written to the output directory:
  encode.stablehlo    encode(weights, images (b, H, W, C) f32 [, source_rays (b, H, W, 6) f32])
                      -> (h (b, F), z (b, latent_dim)); one view per example (a K-view latent
                      is the mean of its views' z, as `SODA.encode` computes it)
  encode.safetensors  its `weights`: params.encoder.*, params.head.*, batch_stats.encoder.*
  denoise.stablehlo   denoise(weights, x_t (b, H, W, C) f32, t (b,) f32, z (b, latent_dim) f32,
                              keep (b, S) bool [, pose inputs])
                      -> the decoder's prediction (b, H, W, C) (eps | v | x0, per the config);
                      pose inputs by config.model.pose: 'none' none, 'box' target_box (b, 4) f32
                      and pose_keep (b,) bool, 'rays' pose_keep (b,) bool and target_rays
                      (b, H, W, 6) f32 (Plucker rays, soda_jax.data.cameras)
  denoise.safetensors its `weights`: params.decoder.*
  stablehlo.json      the signatures above, the platforms, the config

Params are **arguments**, not constants baked into the module: `weights` is a flat dict
{dotted name: array} (exactly the tensors of the .safetensors beside it). Why: the serialized
module stays small (kilobytes to a few MB, whatever the model size) and well under
serialization's 2 GiB cap for big models; one exported program serves EMA and online params or
any later checkpoint of the same config; and XLA does not constant-fold hundreds of MB of
weights when the consumer compiles it. A consumer needs only jax and safetensors:

  exp = jax.export.deserialize(open('encode.stablehlo', 'rb').read())
  h, z = exp.call(safetensors.numpy.load_file('encode.safetensors'), images)
"""
import json
import os
from typing import Any, Dict, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy

from soda_jax.data import cameras
from soda_jax.export import variables as variables_lib
from soda_jax.models import soda

ENCODE_PARAMS = ("encoder", "head")
DENOISE_PARAMS = ("decoder",)
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def _weights_spec(weights: Mapping[str, Any]) -> Dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in weights.items()}


def encode_weights(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  return variables_lib.flatten(variables_lib.subset(variables, ENCODE_PARAMS))


def denoise_weights(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  return variables_lib.flatten(variables_lib.subset(variables, DENOISE_PARAMS))


def export_encode(model: soda.SODA, variables: Mapping[str, Any],
                  config: ml_collections.ConfigDict,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  def encode(weights, *args):
    return model.apply(variables_lib.unflatten(weights), **dict(zip(inputs, args)),
                       method=soda.SODA.encode)

  (b,) = jax.export.symbolic_shape("b")
  inputs = encode_inputs(config, b)
  return jax.export.export(jax.jit(encode), platforms=tuple(platforms))(
      _weights_spec(encode_weights(variables)), *inputs.values())


def encode_inputs(config: ml_collections.ConfigDict, batch) -> Dict[str, Any]:
  """ShapeDtypeStructs of encode's inputs after `weights`, in order (`SODA.encode`'s names)."""
  s, c = config.data.image_size, config.data.channels
  inputs = {"x": jax.ShapeDtypeStruct((batch, s, s, c), jnp.float32)}
  if config.model.pose == "rays":
    inputs["source_rays"] = jax.ShapeDtypeStruct((batch, s, s, cameras.RAY_CHANNELS),
                                                 jnp.float32)
  return inputs


def denoise_inputs(model: soda.SODA, config: ml_collections.ConfigDict, batch) -> Dict[str, Any]:
  """ShapeDtypeStructs of denoise's inputs after `weights`, in order (`SODA.denoise`'s names),
  for a batch size."""
  s, c = config.data.image_size, config.data.channels
  f32 = jnp.float32
  inputs = {"x_t": jax.ShapeDtypeStruct((batch, s, s, c), f32),
            "t": jax.ShapeDtypeStruct((batch,), f32),
            "z": jax.ShapeDtypeStruct((batch, config.model.latent_dim), f32),
            "keep": jax.ShapeDtypeStruct((batch, model.num_subvectors), jnp.bool_)}
  if config.model.pose == "box":
    inputs["target_box"] = jax.ShapeDtypeStruct((batch, 4), f32)
  if config.model.pose in ("box", "rays"):
    inputs["pose_keep"] = jax.ShapeDtypeStruct((batch,), jnp.bool_)
  if config.model.pose == "rays":
    inputs["target_rays"] = jax.ShapeDtypeStruct((batch, s, s, cameras.RAY_CHANNELS), f32)
  return inputs


def export_denoise(model: soda.SODA, variables: Mapping[str, Any],
                   config: ml_collections.ConfigDict,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  def denoise(weights, *args):
    return model.apply(variables_lib.unflatten(weights), **dict(zip(inputs, args)),
                       method=soda.SODA.denoise)

  (b,) = jax.export.symbolic_shape("b")
  inputs = denoise_inputs(model, config, b)
  return jax.export.export(jax.jit(denoise), platforms=tuple(platforms))(
      _weights_spec(denoise_weights(variables)), *inputs.values())


def save(out_dir: str, variables: Mapping[str, Any], config: ml_collections.ConfigDict, *,
         platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Dict[str, str]:
  """Write the files listed in the module docstring; returns {name: path}."""
  model = variables_lib.build_model(config)
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  signature = {"params": "arguments (the .safetensors beside each .stablehlo)",
               "platforms": list(platforms), "config": json.loads(config.to_json())}
  for name, exported, weights in (
      ("encode", export_encode(model, variables, config, platforms), encode_weights(variables)),
      ("denoise", export_denoise(model, variables, config, platforms),
       denoise_weights(variables))):
    paths[name] = os.path.join(out_dir, f"{name}.stablehlo")
    with open(paths[name], "wb") as f:
      f.write(exported.serialize())
    paths[f"{name}_weights"] = os.path.join(out_dir, f"{name}.safetensors")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
                                paths[f"{name}_weights"])
    signature[name] = {"in": [str(a) for a in exported.in_avals[len(weights):]],
                       "out": [str(a) for a in exported.out_avals]}
  signature["encode"]["in_names"] = list(encode_inputs(config, 1))
  signature["denoise"]["in_names"] = list(denoise_inputs(model, config, 1))
  paths["signature"] = os.path.join(out_dir, "stablehlo.json")
  with open(paths["signature"], "w") as f:
    json.dump(signature, f, indent=1)
  return paths
