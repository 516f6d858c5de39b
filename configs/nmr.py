"""3-D novel view synthesis on NMR (ShapeNet, 13 classes, 24 views, 64x64): accelerator-sized.

Point `:folder=` (or --config.data.folder) at the DVR/NMR release (`<synset>/<object>/image`,
`cameras.npz`, `softras_<split>.lst`; see data/multiview_readers.py), e.g.
python -m soda_jax.main --config=configs/nmr.py:folder=/data/NMR_Dataset --workdir=...
Trains with 1 or 2 source views per example (latents averaged), evaluates with 1 and 3. Not run
in this project yet: sizes follow the cifar10 recipe scaled to 64x64, not a tuned recipe.
"""
from soda_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, folder="", runlocal=False)
  c = config_base.base_config("cifar10")
  config_base.use_multiview(c, "nmr", image_size=64, num_source_views=2)
  c.data.folder = a.folder
  c.data.eval_split = "test"
  c.model.latent_dim = 512
  c.model.ray_freqs = 6
  # 64 -> 32 -> 16 -> 8: 4 levels, 5 sub-vectors; attention at 16 and 8.
  c.model.decoder.attention_resolutions = (16, 8)
  c.batch_size = 256
  c.num_train_steps = 300_000
  c.compute_dtype = "bfloat16"
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 5000
  c.optim.ema_decay = 0.9999
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.diffusion.sample_steps = 50
  c.evals.nvs_objects = 512
  if a.runlocal:
    c.batch_size = 16
    c.num_train_steps = 5
    c.compute_dtype = "float32"
    c.evals.nvs_objects = 8
  return c
