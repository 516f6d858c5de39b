"""ImageNet recipe: ResNet-50 -> 2048-d z, decoder on 128x128 targets (6 sub-vectors).

Prepare `imagenet2012` as tfds ArrayRecord offline, set `--config.data.tfds_data_dir`, run on a
TPU pod / GPU node with `launch/`. `:runlocal=True` shrinks batch/steps for a smoke test.
"""
from soda_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, runlocal=False)
  c = config_base.base_config("imagenet")
  c.data.name = "imagenet2012"
  c.data.image_size = 128
  c.data.channels = 3
  c.data.crop_scale = (0.2, 1.0)
  c.data.color_jitter = 0.4
  c.batch_size = 2048
  c.num_train_steps = 500_000
  c.compute_dtype = "bfloat16"
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10_000
  c.optim.ema_decay = 0.9999
  c.mesh.shape = (-1, 1)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.evals.samples_every_steps = 10_000
  c.evals.probe_every_steps = 50_000
  c.evals.probe_train_examples = 100_000
  c.evals.probe_test_examples = 50_000
  c.distributed = True
  if a.runlocal:
    c.batch_size = 16
    c.num_train_steps = 5
    c.compute_dtype = "float32"
    c.distributed = False
  return c
