"""Tiny SODA on synthetic shapes: compiles in seconds on CPU. Used by tests and smoke runs."""
from soda_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, dataset="synthetic")
  c = config_base.base_config("tiny")
  c.data.name = a.dataset
  c.data.image_size = 16
  c.data.channels = 1
  c.batch_size = 16
  c.num_train_steps = 20
  c.optim.warmup_steps = 5
  c.optim.lr = 1e-3
  # Constant after warm-up: a cosine decay puts num_train_steps into the train step's program, so
  # every test run of another length would compile its own (~30 s each on 2 CPU cores).
  c.optim.lr_schedule = "constant"
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.diffusion.sample_steps = 4
  c.evals.num_samples = 4
  c.evals.probe_every_steps = -1  # tests turn the probe and z-usage on where they need them
  c.evals.z_usage_every_steps = -1
  c.evals.probe_train_examples = 256
  c.evals.probe_test_examples = 128
  return c
