"""`encode` as a TensorFlow SavedModel, through jax2tf native serialization.

Signature 'serving_default': images (None, H, W, C) float32 -> {'h': (None, F), 'z': (None,
latent_dim)}. The weights are non-trainable `tf.Variable`s of the SavedModel (named by their
flat dotted paths), fed to one XlaCallModule op that holds the StableHLO of `encode`, lowered
for CPU, CUDA and TPU with a symbolic batch dimension.

Why jax2tf and not orbax-export: jax2tf ships inside the pinned jax (0.10.x) and its native
serialization is the path TensorFlow 2.21's XlaCallModule reads; orbax-export is a further
package (not in requirements.txt) that wraps the same jax2tf call. The graph-mode (non-native)
jax2tf that tf2onnx could have read op by op is gone from this jax, so the SavedModel is one
XlaCallModule op and TF-level tools that rewrite graphs (tf2onnx, TFLite) cannot convert it.
"""
import os
from typing import Any, Mapping, Sequence

import ml_collections

from soda_jax.export import stablehlo, variables as variables_lib
from soda_jax.models import soda

DIRNAME = "saved_model"


def save(out_dir: str, variables: Mapping[str, Any], config: ml_collections.ConfigDict, *,
         platforms: Sequence[str] = stablehlo.DEFAULT_PLATFORMS) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  model = variables_lib.build_model(config)

  def encode(weights, images):
    return model.apply(variables_lib.unflatten(weights), images, method=soda.SODA.encode)

  converted = jax2tf.convert(encode, polymorphic_shapes=[None, "(b, ...)"], with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.weights = {k: tf.Variable(v, trainable=False, name=k)
                    for k, v in stablehlo.encode_weights(variables).items()}
  s, c = config.data.image_size, config.data.channels

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec((None, s, s, c), tf.float32, name="images")])
  def serve(images):
    h, z = converted(module.weights, images)
    return {"h": h, "z": z}

  module.serve = serve
  path = os.path.join(out_dir, DIRNAME)
  tf.saved_model.save(module, path, signatures={"serving_default": serve})
  return path
