"""Sampling from latents: `decode(encode(x))` is `generate(x)`, and bad latents are named."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from soda_jax import compile_once, config_base, sharding
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


def _step_programs() -> int:
  """DDIM step programs compiled in this process so far."""
  return generate._step.__wrapped__._cache_size()  # pylint: disable=protected-access


def test_decode_of_encoded_z_is_generate(setup):
  model, variables, source, dcfg = setup
  rng = jax.random.PRNGKey(3)
  # Jitted: eagerly, every op of the encoder would be its own compile (~30 s on XLA:CPU).
  _, z = jax.jit(lambda v, x: model.apply(v, x, method=soda.SODA.encode))(variables, source)
  from_source = generate.generate(model, variables, jnp.asarray(source), rng, dcfg)
  programs = _step_programs()
  from_z = generate.decode(model, variables, z, rng, dcfg, source.shape[1:])
  assert from_z.shape == source.shape
  # (encode compiled here and in generate: the same program, float32 rounding apart at most)
  np.testing.assert_allclose(np.asarray(from_z), np.asarray(from_source), atol=1e-4)
  # The DDIM step program `generate` built served every step of decode's calls as well (k is
  # an argument, not a constant; x keeps its layout).
  assert _step_programs() == programs
  # z matters: another latent gives another sample from the same noise.
  other = generate.decode(model, variables, z[::-1], rng, dcfg, source.shape[1:])
  assert float(jnp.max(jnp.abs(other[0] - from_z[0]))) > 1e-3


def test_decode_from_host_latents_beside_variables_on_a_mesh_compiles_one_step(setup):
  """Variables replicated over a 4-device mesh, z from the host: z is placed on the mesh too,
  so x keeps one layout from x_T on and every step of every call is one program."""
  model, variables, source, dcfg = setup
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(4, 1), ("data", "fsdp"))
  on_mesh = jax.device_put(variables, sharding.replicated(mesh))
  z = np.random.default_rng(1).normal(size=(3, model.latent_dim)).astype(np.float32)  # new shape
  before = _step_programs()
  first = generate.decode(model, on_mesh, z, jax.random.PRNGKey(0), dcfg, source.shape[1:])
  again = generate.decode(model, on_mesh, z, jax.random.PRNGKey(0), dcfg, source.shape[1:])
  assert _step_programs() - before == 1
  np.testing.assert_array_equal(first, again)
  # The same samples as with host variables (one device), float32 rounding apart.
  host = generate.decode(model, variables, z, jax.random.PRNGKey(0), dcfg, source.shape[1:])
  np.testing.assert_allclose(first, host, atol=1e-5)


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
