"""Bad configs fail up front with a message naming the key and the bad value."""
import os

import pytest

from soda_jax import config_base, config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  return config_base.load_config(os.path.join(ROOT, "configs", f"{name}.py"), arg)


@pytest.mark.parametrize("name,arg", [("tiny", None), ("demo", None), ("cifar10", None),
                                      ("cifar10", "arch=peer"), ("imagenet", None),
                                      ("imagenet", "runlocal=True"), ("nvs_synthetic", None),
                                      ("nvs_synthetic", "variant=tiny"), ("nmr", None),
                                      ("srn_cars", None)])
def test_shipped_configs_are_valid(name, arg):
  c = load_config(name, arg)
  config_checks.check(c)  # model + diffusion
  if name in ("tiny", "demo", "nvs_synthetic"):  # datasets offline; others need data prepared
    config_checks.check(c, num_devices=8)


def test_loading_configs_does_not_start_jax():
  """The CLI loads its config and checks the backend, then restarts itself on another allocator
  (cpu_devices.use_fast_malloc) before JAX starts: neither may import JAX or grain (~2 s each
  time, paid twice by that restart)."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  code = ("import sys\n"
          "from soda_jax import config_base, cpu_devices\n"
          "for name in sys.argv[1:]:\n"
          "  config_base.load_config(f'configs/{name}.py')\n"
          "assert cpu_devices._cpu_backend_to_come('test')\n"
          "print(sorted(m for m in ('jax', 'jaxlib', 'grain', 'flax', 'tensorflow') "
          "if m in sys.modules))\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  p = subprocess.run([sys.executable, "-c", code, "tiny", "demo", "cifar10", "imagenet",
                      "nvs_synthetic", "nmr", "srn_cars"], cwd=ROOT,
                     env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip() == "[]", p.stdout


@pytest.mark.parametrize("key,value,message", [
    ("model.latent_dim", 2, "config.model.latent_dim=2 is smaller than the number of sub-vectors (3"),
    ("diffusion.schedule", "sigmoid", "config.diffusion.schedule='sigmoid' is not one of"),
    ("diffusion.pred_type", "score", "config.diffusion.pred_type='score'"),
    ("model.decoder.num_groups", 5, "config.model.decoder.num_groups=5 does not divide"),
    ("model.encoder.num_groups", 3, "config.model.encoder.num_groups=3 does not divide"),
    ("model.encoder.depth", 20, "config.model.encoder.depth=20 is not one of (18, 34, 50)"),
    ("model.modulation", "film", "config.model.modulation='film'"),
    ("model.decoder.attention_resolutions", (5,), "attention_resolutions contains 5"),
    ("diffusion.layer_mask_rate", 1.5, "config.diffusion.layer_mask_rate=1.5 must be in [0.0, 1.0]"),
    ("model.decoder.channel_mult", (), "config.model.decoder.channel_mult=()"),
    ("diffusion.clip_x0", -1.0, "config.diffusion.clip_x0=-1.0 must be a number > 0 or None"),
    ("diffusion.t_power", 0.0, "config.diffusion.t_power=0.0 must be a number > 0"),
])
def test_bad_model_config_names_key_and_value(key, value, message):
  c = config_base.override(load_config("tiny"), {key: value})
  with pytest.raises(ValueError) as e:
    config_checks.check(c)
  assert message in str(e.value)


@pytest.mark.parametrize("key,value,devices,message", [
    ("batch_size", 12, 8, "config.batch_size=12 is not divisible by the 8 devices"),
    ("mesh.shape", (3, -1), 8, "config.mesh.shape=(3, -1) does not fit 8 devices"),
    ("mesh.shape", (2, 2), 8, "config.mesh.shape=(2, 2) does not fit 8 devices"),
    ("mesh.min_shard_elements", -1, 8, "config.mesh.min_shard_elements=-1 must be an int >= 0"),
    ("compute_dtype", "float16", 8, "config.compute_dtype='float16' is not one of"),
    ("data.name", "no_such_dataset_xyz", 8, "no_such_dataset_xyz"),
    ("optim.ema_decay", 1.5, 8, "config.optim.ema_decay=1.5"),
])
def test_bad_training_config_names_key_and_value(key, value, devices, message):
  c = config_base.override(load_config("tiny"), {key: value})
  with pytest.raises(ValueError) as e:
    config_checks.check(c, num_devices=devices)
  assert message in str(e.value)


def test_all_errors_reported_at_once():
  c = load_config("tiny")
  with c.unlocked():
    c.diffusion.schedule = "x"
    c.model.modulation = "y"
  with pytest.raises(ValueError) as e:
    config_checks.check(c)
  assert "schedule='x'" in str(e.value) and "modulation='y'" in str(e.value)


def test_parse_arg():
  a = config_base.parse_arg("steps=10,runlocal=True", steps=5, runlocal=False, arch="soda")
  assert a.steps == 10 and a.runlocal is True and a.arch == "soda"
  with pytest.raises(ValueError, match="'stepz'"):
    config_base.parse_arg("stepz=1", steps=5)


@pytest.mark.parametrize("key,value", [("optim.lr", float("nan")), ("optim.weight_decay", float("inf")),
                                       ("data.crop_scale", (0.2, float("-inf")))])
def test_non_finite_numbers_are_rejected(key, value):
  c = config_base.override(load_config("tiny"), {key: value})
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.check(c)
  assert f"config.{key}={value!r} is not finite" in str(e.value)


def test_main_prints_config_errors_without_traceback(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from soda_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  # No device count in XLA_FLAGS: main picks one per core before JAX starts (cpu_devices).
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_backend_optimization_level=1")
  p = subprocess.run([sys.executable, "-m", "soda_jax.main", "--config=configs/tiny.py",
                      f"--workdir={tmp_path}", "--config.optim.lr=nan",
                      "--config.optim.grad_clip=inf"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "Error: Invalid config:" in p.stderr
  assert "config.optim.lr=nan is not finite" in p.stderr
  assert "config.optim.grad_clip=inf is not finite" in p.stderr
  n = cpu_devices.device_count(cpu_devices.usable_cores(), 16)  # tiny.py's batch
  assert f"the batch of 16 split over {n} CPU devices" in p.stderr
  assert f"JAX process 0/1, {n} local devices" in p.stderr
