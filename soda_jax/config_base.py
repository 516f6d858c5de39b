"""The config schema with defaults; files under configs/ start from `base_config()` and edit it.

One place defines every key, so `config_checks` can validate all of them and a typo on the
command line (`--config.modle.latent_dim=...`) fails at parse time (configs are locked).
"""
import ml_collections

# Loading a config must not start JAX: the CLI restarts itself on another allocator right after
# (cpu_devices.use_fast_malloc), and JAX and grain take ~2 s to import. sources imports NumPy only.
from soda_jax.data.sources import DEFAULT_IDX_ROOT

# Model sizes, shared by configs and tests. See docs/design.md for the reasoning.
MODEL_VARIANTS = {
    # Compiles in seconds on CPU: tests and smoke runs.
    "tiny": dict(
        encoder=dict(depth=18, version="v2", stem="cifar", width=8, num_groups=4),
        latent_dim=24,
        decoder=dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), head_dim=16, num_groups=4, dropout=0.0)),
    # The embedded-default demo on a 2-core CPU (Fashion-MNIST, 28x28). A 16-channel decoder
    # (0.32M params) probes as well as a 32-channel one (1.23M; 80.4 vs 80.5 at 1500 steps) in
    # less time per step: the demo's budget goes to the encoder (docs/benchmarks.md).
    "demo": dict(
        encoder=dict(depth=18, version="v1.5", stem="cifar", width=16, num_groups=8),
        latent_dim=128,
        decoder=dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(8,), head_dim=32, num_groups=8, dropout=0.0)),
    # CIFAR-10 recipe: R18 (cifar stem) + a 128-channel UNet (1, 2, 2, 2).
    "cifar10": dict(
        encoder=dict(depth=18, version="v1.5", stem="cifar", width=64, num_groups=32),
        latent_dim=128,
        decoder=dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                     attention_resolutions=(16,), head_dim=64, num_groups=32, dropout=0.1)),
    # ImageNet: R50 -> 2048-d z; decoder on 128x128 targets, 5 levels -> 6 sub-vectors.
    "imagenet": dict(
        encoder=dict(depth=50, version="v1.5", stem="imagenet", width=64, num_groups=32),
        latent_dim=2048,
        decoder=dict(base_channels=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
                     attention_resolutions=(16, 8), head_dim=64, num_groups=32, dropout=0.0)),
}


# A key added to `model` later must default to the old behaviour, the same in every variant: a
# checkpoint written before the key existed resumes when the key is at its base_config default
# (checkpointing.check_compatible).
def model_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in MODEL_VARIANTS:
    raise ValueError(f"model variant={variant!r} is not one of {tuple(MODEL_VARIANTS)}")
  v = MODEL_VARIANTS[variant]
  m = ml_collections.ConfigDict()
  m.encoder = ml_collections.ConfigDict(dict(v["encoder"]))
  m.latent_dim = v["latent_dim"]
  m.modulation = "layer"  # 'layer' (SODA) | 'global' (whole z to every block)
  m.pose = "none"  # 'none' | 'box' (target crop box relative to the source, as a pose map)
  # Init of each block's latent projection: 'lecun' | 'zero'. With 'zero' (and the zero output
  # conv of every res block) the encoder gets no gradient until both have grown. On the demo
  # 'lecun' ends at k-NN 74.6-76.1 over three seeds where 'zero' fell to 66-70, probe 79.1
  # (docs/benchmarks.md, session 7).
  # z still has no effect at init: each res block's zero-initialised conv_1 comes after it.
  m.latent_init = "lecun"
  m.latent_act = "none"  # on z before the projections: 'none' | 'silu'
  dec = dict(num_heads=0, remat=False)
  dec.update(v["decoder"])
  m.decoder = ml_collections.ConfigDict(dec)
  m.decoder.channel_mult = tuple(m.decoder.channel_mult)
  m.decoder.attention_resolutions = tuple(m.decoder.attention_resolutions)
  # pose='rays' (3-D views): Fourier frequencies of the per-pixel Plucker rays of the target
  # camera (decoder input) and of each source camera (encoder input).
  m.ray_freqs = 4
  return m


def diffusion_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      schedule="inverted",  # 'inverted' | 'cosine' | 'linear'
      # 'v' | 'eps' | 'x0'. v, not DESIGN.md's eps: the inverted schedule reaches a = 0 at t = 1,
      # where an eps model's x0 = (x_t - sqrt(1-a) eps) / sqrt(a) multiplies its error by ~300;
      # sampling from pure noise then fails (demo recon PSNR 4.6 dB). v stays well conditioned and
      # weights the high-noise end, where the decoder must lean on z, by |dx0|^2 instead of ~0.
      pred_type="v",
      loss_weighting="none",
      # Training t = 1 - (1 - u)^t_power: 1 = U(0, 1) as in the paper; > 1 = more high noise.
      t_power=1.0,
      layer_mask_rate=0.1,
      latent_drop_rate=0.1,
      pose_drop_rate=0.1,
      # Sampling (reconstructions, novel views).
      sample_steps=50,
      eta=0.0,
      clip_x0=1.0,  # clip x0 estimates to the data range [-1, 1] while sampling (None: off)
      w_z=1.0,
      w_p=1.0,  # w_z = w_p = 1: the plain conditional (latent and pose), one call per step
  ))


def data_config() -> ml_collections.ConfigDict:
  """config.data defaults."""
  return ml_collections.ConfigDict(dict(
      name="synthetic",  # 'fashion_mnist' | 'synthetic' | 'folder' | 'tfds:<name>' | tfds name
      split="train",  # tfds-style slices work everywhere: 'train[:90%]'
      eval_split="test",
      image_size=32,
      channels=3,  # 1 or 3: grey is repeated to 3, colour converted to luma for 1
      crop_scale=(0.2, 1.0),  # area fraction of the random-resized crops
      crop_ratio=(3 / 4, 4 / 3),  # aspect range (width / height) of the crops
      flip=True,
      color_jitter=0.0,  # brightness/contrast/saturation strength, 0 = off
      same_view=False,  # target = source (auto-encoding ablation)
      idx_root=DEFAULT_IDX_ROOT,  # Fashion-MNIST IDX files
      tfds_data_dir="",  # '' = tfds default (~/tensorflow_datasets)
      folder="",  # name='folder': root/[split/]class/*.png|jpg|jpeg
      synthetic_examples=4096,  # name='synthetic': train size (other splits get a quarter)
      # grain read/decode threads per process: 0 = in the main thread (best for in-memory
      # data: threads only add GIL contention), -1 = auto (0 for in-memory sources, else 16:
      # JPEG decoding and file reads release the GIL).
      num_threads=-1,
      prefetch=4,  # batches buffered ahead per process
      # Multi-view names (sources.MULTIVIEW_NAMES): source views per example, each encoded,
      # their latents averaged. 'synthetic_multiview' uses synthetic_examples train objects.
      num_source_views=1,
      # Training draws k ~ U{min_source_views..num_source_views} views per example (K views
      # are read, the first k averaged), so one model serves NVS from 1 view and from several.
      min_source_views=1,
  ))


def base_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Every key the system reads, with defaults for a tiny CPU run."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, over all devices and processes
  c.num_train_steps = 100
  c.compute_dtype = "float32"  # 'float32' | 'bfloat16'; params are always float32
  c.data = data_config()
  c.model = model_config(variant)
  c.diffusion = diffusion_config()

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-4, warmup_steps=100, lr_schedule="cosine",  # 'cosine' | 'constant'
      weight_decay=0.05, b1=0.9, b2=0.99, grad_clip=1.0,
      encoder_lr_mult=1.0,  # encoder lr = lr * this
      ema_decay=0.999,
  ))

  # Mesh: axes ('data', 'fsdp'); -1 fills with the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
  # Leaves with fewer elements stay replicated (sharding.py): each sharded leaf costs FSDP
  # collectives every step, and a bias is not worth one.
  c.mesh.min_shard_elements = 2 ** 14
  # Logical param axes -> mesh axes (None = replicated). FSDP shards output channels; a dim not
  # divisible by its mesh axes stays replicated and is counted in the parameter overview.
  c.sharding_rules = (
      ("conv_out", "fsdp"), ("embed_out", "fsdp"),
      ("conv_h", None), ("conv_w", None), ("conv_in", None), ("embed_in", None), ("norm", None),
  )

  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.evals = ml_collections.ConfigDict(dict(
      samples_every_steps=0,  # 0 = only at the end
      num_samples=8,
      probe_every_steps=0,  # 0 = only at the end; -1 = never
      # Decoder's x0-error with true / shuffled / dropped z on a held-out two-view batch
      # (evaluate/z_usage.py): 0 = only at the end; -1 = never.
      z_usage_every_steps=0,
      z_usage_examples=64,
      probe_train_examples=2000,
      probe_test_examples=1000,
      # 3-D novel view synthesis (evaluate/nvs.py, at the end of a multi-view run): PSNR/SSIM
      # of DDIM samples on nvs_objects test objects for each K in nvs_source_views, and a
      # turntable grid of nvs_grid_objects objects x nvs_turntable target cameras.
      nvs_objects=32,
      nvs_source_views=(1, 3),
      nvs_grid_objects=4,
      nvs_turntable=6,
      # The held-out draw (objects' views) and the sampler's noise: fixed, not config.seed, so
      # runs of different seeds are scored on the same views (the copy baseline alone moved
      # 12.19-13.76 dB with config.seed over 32 objects, session 18).
      nvs_seed=0,
  ))
  c.distributed = False  # call jax.distributed.initialize() (multi-host pods)
  # Persistent XLA cache: 'auto' = ~/.cache/soda_jax/xla (unless already set), '' = off, or a dir.
  c.compilation_cache_dir = "auto"
  return c


def use_multiview(c: ml_collections.ConfigDict, name: str, image_size: int,
                  num_source_views: int) -> ml_collections.ConfigDict:
  """Switch a config to 3-D novel view synthesis on a multi-view dataset (in place).

  Camera rays condition the model (pose='rays'); the 2-D evaluations (sample grids, probes) are
  off, the NVS evaluation (evaluate/nvs.py) runs at the end instead; z-usage runs on held-out
  objects (source views -> a target view from another camera).
  """
  c.data.name = name
  c.data.image_size = image_size
  c.data.channels = 3
  c.data.num_source_views = num_source_views
  c.model.pose = "rays"
  c.evals.num_samples = 0
  c.evals.probe_every_steps = -1
  return c


def parse_arg(arg, **defaults):
  """`"variant=r50,runlocal=True"` -> ConfigDict with `defaults` overridden (types preserved).

  The big_vision idiom for `--config=configs/x.py:variant=...`. Unknown keys raise.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {tuple(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value not in ("True", "False", "true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a bool")
      out[key] = value in ("True", "true", "1")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def load_config(path: str, arg=None) -> ml_collections.ConfigDict:
  """Load `configs/x.py` (with its `get_config(arg)`) outside absl flags: Colabs, tools, tests."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set ({'model.modulation': 'global'}); unknown keys raise."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config key {key!r} does not exist")
    node[leaf] = value
  return config
