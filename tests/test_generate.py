"""Sampling from latents: `decode(encode(x))` is `generate(x)`, and bad latents are named."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from soda_jax import compile_once, config_base
from soda_jax.evaluate import generate
from soda_jax.models import soda
from tests.random_params import perturbed

IMG = 8


@pytest.fixture(scope="module")
def setup():
  model = soda.build_model(config_base.model_config("tiny"), image_channels=1)
  inputs = soda.init_inputs(2, IMG, 1, model.num_subvectors)
  # Perturbed: the zero-initialised output conv would make every sample the same.
  variables = perturbed(compile_once.init(model, jax.random.PRNGKey(0), **inputs))
  source = np.random.default_rng(0).uniform(-1, 1, (2, IMG, IMG, 1)).astype(np.float32)
  dcfg = ml_collections.ConfigDict(dict(schedule="inverted", pred_type="v", sample_steps=2,
                                        eta=0.0, w_z=1.0, w_p=1.0, clip_x0=1.0))
  return model, variables, source, dcfg


def test_decode_of_encoded_z_is_generate(setup):
  model, variables, source, dcfg = setup
  rng = jax.random.PRNGKey(3)
  programs = generate._step.__wrapped__._cache_size()  # pylint: disable=protected-access
  # Jitted: eagerly, every op of the encoder would be its own compile (~30 s on XLA:CPU).
  _, z = jax.jit(lambda v, x: model.apply(v, x, method=soda.SODA.encode))(variables, source)
  from_source = generate.generate(model, variables, jnp.asarray(source), rng, dcfg)
  from_z = generate.decode(model, variables, z, rng, dcfg, source.shape[1:])
  assert from_z.shape == source.shape
  # (encode compiled here and in generate: the same program, float32 rounding apart at most)
  np.testing.assert_allclose(np.asarray(from_z), np.asarray(from_source), atol=1e-4)
  # At most one new DDIM step program served every step of both samplers (k is an argument,
  # not a constant; x keeps its layout). The count is per process: other tests add theirs.
  assert generate._step.__wrapped__._cache_size() - programs <= 1  # pylint: disable=protected-access
  # z matters: another latent gives another sample from the same noise.
  other = generate.decode(model, variables, z[::-1], rng, dcfg, source.shape[1:])
  assert float(jnp.max(jnp.abs(other[0] - from_z[0]))) > 1e-3


def test_decode_names_a_bad_latent(setup):
  model, variables, source, dcfg = setup
  with pytest.raises(ValueError, match=rf"z has shape \(2, 5\); expected \(B, {model.latent_dim}\)"):
    generate.decode(model, variables, np.zeros((2, 5)), jax.random.PRNGKey(0), dcfg,
                    source.shape[1:])


def test_ddim_step_program_has_no_loop(setup):
  """The DDIM loop stays on the host: XLA:CPU computed wrong rows inside a while loop of the
  denoiser when two devices ran it at once (docs/benchmarks.md, "Session 36")."""
  model, variables, source, dcfg = setup
  z, x = jnp.zeros((2, model.latent_dim)), jnp.zeros(source.shape)
  text = generate._step.lower(  # pylint: disable=protected-access
      model, variables, z, generate._identity_boxes(2), x, np.int32(0),  # pylint: disable=protected-access
      jax.random.PRNGKey(0), **generate._sampler_kwargs(dcfg, None)).as_text()  # pylint: disable=protected-access
  assert "stablehlo.convolution" in text and "stablehlo.while" not in text  # the UNet, no loop
