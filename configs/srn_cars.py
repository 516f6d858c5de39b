"""3-D novel view synthesis on SRN cars (128x128): accelerator-sized.

Point `:folder=` at the directory holding `cars_train/` and `cars_test/` (SRN layout:
`<object>/rgb`, `pose`, `intrinsics.txt`; see data/multiview_readers.py), e.g.
python -m soda_jax.main --config=configs/srn_cars.py:folder=/data/srn_cars --workdir=...
Trains with 1 or 2 source views per example (latents averaged), evaluates with 1 and 3. Not run
in this project yet: sizes follow the imagenet recipe's 128x128 decoder, not a tuned recipe.
"""
from soda_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, folder="", runlocal=False)
  c = config_base.base_config("imagenet")
  config_base.use_multiview(c, "srn", image_size=128, num_source_views=2)
  c.data.folder = a.folder
  c.data.eval_split = "test"
  c.model.encoder.depth = 34
  c.model.latent_dim = 1024
  c.model.ray_freqs = 6
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
