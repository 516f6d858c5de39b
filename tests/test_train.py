"""The training system end to end: sharded one-step run, loss falls, bitwise resume, SIGTERM."""
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from soda_jax import checkpointing, config_base, sharding, train, train_step
from tests.test_config_checks import ROOT, load_config


def _tiny(**overrides):
  return config_base.override(load_config("tiny"), overrides)


def _leaf(tree, *path):
  for p in path:
    tree = tree[p]
  return tree


# The tiny state's layout under the sharding rules, on a mesh with `fsdp` devices on that axis:
# an encoder conv kernel (3, 3, 64, 64), 36864 elements, has its output channels split over
# 'fsdp', and so do its Adam moments and its EMA copy; a decoder conv kernel (3, 3, 16, 16) is
# under mesh.min_shard_elements (2**14) and stays whole on every device, moments included.
BIG = ("encoder", "layer4_1", "conv2", "kernel")
SMALL = ("decoder", "down_0_res_0", "conv_0", "kernel")


def check_rule_layout(trees, fsdp, spec, shard_shape):
  """`trees`: params, Adam mu and EMA params, in any form (arrays, abstract arrays, checkpoint
  metadata); `spec(leaf)` its partition spec as a tuple, `shard_shape(leaf)` one device's part."""
  for tree in trees:
    assert tuple(spec(_leaf(tree, *BIG))) == (None, None, None, "fsdp")
    assert tuple(shard_shape(_leaf(tree, *BIG))) == (3, 3, 64, 64 // fsdp)
    assert tuple(spec(_leaf(tree, *SMALL))) == ()
    assert tuple(shard_shape(_leaf(tree, *SMALL))) == (3, 3, 16, 16)


@pytest.mark.slow
def test_one_step_is_sharded_as_the_rules_say(tmp_path):
  """A train step on the (8, 1) mesh keeps the state in the rules' layout. The same on a (2, 2)
  mesh, for real across two processes: test_multiprocess.py reads the layout its checkpoints
  were saved with; test_fsdp_layout_follows_the_rules checks the rules there without compiling."""
  c = _tiny(**{"num_train_steps": 1, "mesh.shape": (8, 1), "evals.num_samples": 0})
  out = train.train_and_evaluate(c, str(tmp_path))
  state = out["state"]
  assert int(state.step) == 1
  mu = state.opt_state[1][0].mu  # chain: (clip, adamw=(scale_by_adam, ...))
  check_rule_layout((state.params, mu, state.ema_params), 1, lambda a: a.sharding.spec,
                    lambda a: a.addressable_shards[0].data.shape)
  # The loss was logged and is finite.
  (step, summary), = out["history"]
  assert step == 1 and np.isfinite(summary["loss"])
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "1"))


def test_fsdp_layout_follows_the_rules():
  """On a (2, 4) mesh the abstract state (the restore target; its shardings are the init's and
  the train step's out_shardings) splits what the rules say over 'fsdp', nothing compiled."""
  c = _tiny(**{"mesh.shape": (2, 4)})
  model, tx = train_step.build_model(c), train_step.make_optimizer(c)
  abstract, _, _ = train_step.abstract_state(
      model, tx, c, sharding.make_mesh(c), jax.ShapeDtypeStruct((2,), np.uint32))
  mu = abstract.opt_state[1][0].mu
  check_rule_layout((abstract.params, mu, abstract.ema_params), 4, lambda a: a.sharding.spec,
                    lambda a: a.sharding.shard_shape(a.shape))


@pytest.mark.slow
def test_demo_loss_falls(tmp_path, optimized_kernels):  # pylint: disable=unused-argument
  """The demo config's loss over its first 60 steps (on a 16x16 slice to keep CI fast): the
  28x28 demo's falls from 0.71 (steps 1-25) to 0.13 (76-100). Here, at batch 16 (measured):
  0.750 (steps 1-10) -> 0.273 / 0.241 (41-50 / 51-60) with the 32-channel decoder; 0.757 ->
  0.364 / 0.291 with the 16-channel one and latent_init='lecun' (session 7 defaults); 0.757 ->
  0.365 / 0.297 with the encoder's lr doubled (session 8); 0.655 -> 0.444 / 0.400 with the box
  pose and t_power=3 (session 12: more draws at high noise, where the loss cannot fall as far);
  0.599 -> 0.387 / 0.367 with crops of 50-100% and t_power=8 (session 20)."""
  c = config_base.override(load_config("demo"), {
      "num_train_steps": 60, "log_every_steps": 10, "checkpoint_every_steps": 1000,
      "batch_size": 16, "data.image_size": 16, "model.decoder.attention_resolutions": (4,),
      "evals.num_samples": 0, "evals.probe_every_steps": -1, "evals.z_usage_every_steps": -1})
  out = train.train_and_evaluate(c, str(tmp_path))
  losses = [s["loss"] for _, s in out["history"]]
  print("demo losses every 10 steps:", np.round(losses, 4))
  assert np.mean(losses[-2:]) < 0.7 * losses[0], losses


def _params_of(workdir):
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  step = ckpt.latest_step()
  params = ckpt.restore_raw(step)["params"]
  ckpt.close()
  return step, params


def _main_cmd(workdir, *flags):
  return [sys.executable, "-m", "soda_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", *flags]


def _env():
  env = dict(os.environ)  # conftest's XLA_FLAGS: 8 devices, the suite's compile options
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT
  return env


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_train")  # beside the other tiny runs: their train step is cached
def test_resume_after_kill_is_bitwise_equal(tmp_path):
  """N steps in one go == SIGKILLed once >= N/2 steps are checkpointed, then resumed: bitwise.

  CI runs N=10, checkpoints at 5 and 10 (the property needs a kill between two checkpoints, not
  length);
  SODA_RESUME_STEPS=2000 gives the issue's 2k (passed: 2047 s on 2 busy cores). The
  kill lands at an arbitrary point (possibly mid async save); resume must pick the newest
  *complete* checkpoint and replay data order and randomness exactly.
  """
  steps = int(os.environ.get("SODA_RESUME_STEPS", "10"))
  every = max(5, steps // 8)
  flags = [f"--config.num_train_steps={steps}", f"--config.checkpoint_every_steps={every}",
           "--config.log_every_steps=50", "--config.evals.num_samples=0"]
  straight = tmp_path / "straight"
  subprocess.run(_main_cmd(straight, *flags), cwd=ROOT, env=_env(), check=True,
                 capture_output=True)

  resumed = tmp_path / "resumed"
  proc = subprocess.Popen(_main_cmd(resumed, *flags), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + max(600, steps)  # generous: ~0.3 s/step on 2 cores
  while time.time() < deadline and proc.poll() is None:
    done = checkpointing.steps_on_disk(str(resumed))
    if done and max(done) >= steps // 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(checkpointing.steps_on_disk(str(resumed)))
  assert steps // 2 <= killed_at < steps, killed_at
  subprocess.run(_main_cmd(resumed, *flags), cwd=ROOT, env=_env(), check=True,
                 capture_output=True)

  step_a, params_a = _params_of(straight)
  step_b, params_b = _params_of(resumed)
  assert step_a == step_b == steps
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_train")
def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  flags = ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
           "--config.log_every_steps=1000", "--config.evals.num_samples=0"]
  proc = subprocess.Popen(_main_cmd(tmp_path, *flags), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # Wait until training is under way (the SIGTERM handler is installed), then preempt. Only a
  # watchdog bounds the wait: compiling can take many minutes on 2 shared, busy cores (a 300 s
  # deadline once fired before the loop began, so SIGTERM killed the process outright).
  watchdog = threading.Timer(1800, proc.kill)
  watchdog.start()
  started = False
  for line in proc.stdout:
    if "Starting the training loop" in line or "steps/s" in line:
      started = True
      break
  assert started, "the process exited before its training loop started"
  time.sleep(3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  watchdog.cancel()
  assert proc.returncode == 0, out[-3000:]
  steps = checkpointing.steps_on_disk(str(tmp_path))
  assert len(steps) == 1 and 0 < steps[0] < 100000, steps
  assert f"Stopping at step {steps[0]}" in out
