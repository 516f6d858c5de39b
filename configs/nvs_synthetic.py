"""3-D novel view synthesis on the embedded synthetic objects (data/multiview.py), CPU-sized.

python -m soda_jax.main --config=configs/nvs_synthetic.py --workdir=/tmp/soda_nvs
32x32 views of generated objects (24 azimuths x 2 elevations), 1 or 2 source views per example
(their latents averaged), the target camera's Plucker rays as the decoder's pose. At the end,
evaluate/nvs.py scores samples of held-out views of unseen objects with 1 and 3 source views
against copying the nearest source view and the latent-free model (workdir/nvs_eval.json).

Measured (2-core AMD EPYC, 2 CPU devices, YNNPACK's convolutions (AMD's default until session 33;
not rerun since), docs/benchmarks.md): 1.64-1.84 steps/s when alone, so
~15 min of training plus ~1-2 min of NVS evaluation (renders cached); on a 2-core Intel Xeon
with Eigen's convolutions (session 28) 2.45-2.59 steps/s, the whole run 11 min, and its three
seeds 13.06 / 13.34 dB (0.10-0.17 under YNNPACK's on every seed; on the AMD EPYC, session 35,
half of such a gap was the evaluation: XLA:CPU's sampler loop on 2 devices read 0.03-0.08 dB
low, fixed in session 36 by running the steps as separate calls). After these 1600 steps,
three seeds scored on the same 32 held-out objects: SODA's samples 13.17 +- 0.07 / 13.47 +- 0.08
dB from 1 / 3 views against 12.19 / 14.16 for copying the nearest source view (t_power=3, the earlier
default: 12.79 / 13.14; 800 steps at t_power=3, one seed: 12.53 / 12.78).
Variants: `:steps=N`; `:variant=tiny` (16x16, tiny model, a few steps: tests and smoke runs).
"""
from soda_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, variant="demo", steps=1600)
  if a.variant not in ("demo", "tiny"):
    raise ValueError(f"config argument variant={a.variant!r} is not one of ('demo', 'tiny')")
  c = config_base.base_config(a.variant)
  config_base.use_multiview(c, "synthetic_multiview", image_size=32, num_source_views=2)
  c.data.synthetic_examples = 500  # train objects (x 48 views, rendered once, cached)
  c.model.decoder.attention_resolutions = (8,)
  c.batch_size = 32
  c.num_train_steps = a.steps
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.ema_decay = 0.995
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.diffusion.sample_steps = 25
  # Most training draws at high noise (t = 1 - (1 - u)^8: 42% at t > 0.999), where the target
  # view is hidden and only z and the camera can lower the loss. t_power 1 -> 3: 1-view NVS
  # 10.36 -> 12.54 dB at 800 steps (one seed, session 12); 3 -> 8: 12.79 -> 13.17 (1 view) and
  # 13.14 -> 13.47 (3 views) at 1600 steps, three seeds each, seed sd <= 0.08 (session 18).
  c.diffusion.t_power = 8.0
  c.evals.nvs_objects = 32
  if a.variant == "tiny":
    c.data.image_size = 16
    c.data.synthetic_examples = 16
    c.model.ray_freqs = 2
    c.batch_size = 8
    c.num_train_steps = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 100
    c.diffusion.sample_steps = 2
    c.evals.nvs_objects = 4
    c.evals.nvs_grid_objects = 2
    c.evals.nvs_turntable = 2
    c.evals.z_usage_examples = 4  # the test split's 4 objects, each once (z rolled: no self-pairs)
  return c
