"""The BatchNorm (v1.5) variant of the tiny config that several test modules train.

One definition, so the export tests, the export notebook's smoke run and the EMA test compile
one train step between them (same program: the compilation cache serves the others; they share
the 'export' xdist group so they run one after another on one worker).
"""
import os

import ml_collections

from soda_jax import config_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(depth: int = 18, stem: str = "cifar", width: int = 8,
           image_size: int = 16) -> ml_collections.ConfigDict:
  """tiny.py with a torchvision-shaped encoder (v1.5), 3 channels, 3 steps, no evals."""
  c = config_base.load_config(os.path.join(ROOT, "configs", "tiny.py"))
  c.model.encoder.update(dict(depth=depth, version="v1.5", stem=stem, width=width))
  c.data.update(dict(name="synthetic", channels=3, image_size=image_size))
  c.batch_size = 16
  c.num_train_steps = 3
  c.log_every_steps = 3
  c.checkpoint_every_steps = 3
  c.async_checkpointing = False
  c.evals.num_samples = 0
  c.evals.probe_every_steps = -1
  return c
