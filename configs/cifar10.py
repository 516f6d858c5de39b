"""CIFAR-10 recipe: ResNet-18 (cifar stem) -> 128-d z; 128-channel UNet (1, 2, 2, 2).

Needs the tfds `cifar10` dataset prepared offline (ArrayRecord) under `data.tfds_data_dir`.
Variants: `:arch=peer` (the PyTorch re-implementation's exact sizes; see docs/benchmarks.md),
`:runlocal=True` (tiny batch and steps for a CPU smoke test).
"""
from soda_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, arch="soda", runlocal=False)
  c = config_base.base_config("cifar10")
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.crop_scale = (0.2, 1.0)
  c.data.color_jitter = 0.4
  c.batch_size = 512
  c.num_train_steps = 200_000
  c.compute_dtype = "bfloat16"
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.evals.samples_every_steps = 5000
  c.evals.probe_every_steps = 20000
  if a.arch == "peer":
    # Exactly the widely used PyTorch re-implementation's CIFAR-10 encoder/decoder: global
    # modulation of every block by the whole 128-d z, attention at 16x16 only, dropout 0.1, and
    # one attention head over all channels (its cifar10.yaml leaves attn_channels_per_head unset;
    # before session 30 this config had 4 heads of 64).
    c.model.modulation = "global"
    c.model.decoder.dropout = 0.1
    c.model.decoder.num_heads = 1
  elif a.arch != "soda":
    raise ValueError(f"config argument arch={a.arch!r} is not one of ('soda', 'peer')")
  if a.runlocal:
    c.batch_size = 32
    c.num_train_steps = 10
    c.compute_dtype = "float32"
  return c
