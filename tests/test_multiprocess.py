"""Multi-host for real, on one machine: 2 processes x 2 CPU devices = one (2, 2) mesh, gloo
collectives, each process reading its own share of the data (launch/local_multiprocess.sh).

One test, four launches of both processes. Launch (a) compiles each program once (process 0
compiles and hands the binary over); the restarts load them from the suite's persistent cache on
both processes (multihost.share_cpu_compilation_cache; 89 s cold, alone, on a 2-core AMD EPYC in
session 34). (a) a straight run, whose end-of-run sample grid and probe table only process 0 writes
(d); (c) SIGTERM to ONE process: both stop at the same step, save it and exit 0; (b) the restart
resumes there, both processes are SIGKILLed after its next checkpoint, and the next restart ends
with params bitwise equal to (a)'s. (a)'s checkpoint also shows the layout a real (2, 2) run saves
(the suite's only train step on an FSDP mesh). Checkpoints are saved asynchronously, as in real
runs (the product default; session 5's async hang no longer occurs). Every wait has a timeout, and
the process group is killed on the way out.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from soda_jax import checkpointing, cpu_devices
from tests.test_config_checks import ROOT
from tests.test_train import check_rule_layout

LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
LEVEL = "--xla_backend_optimization_level"
TIMEOUT = int(os.environ.get("SODA_MP_TIMEOUT", "900"))  # per launch; 2 busy cores are slow
STEPS = 6  # ~1.5-2 s a step with 4 devices a process: gloo collectives go over TCP
# Devices per process: the mesh's fsdp axis within each process, its data axis across the two.
# 2 rather than 4: the same layouts and collectives, and the test 107-112 -> 89 s alone (AMD EPYC,
# docs/benchmarks.md, session 34).
FSDP = 2
COMMON = [f"--config.mesh.shape=(2,{FSDP})", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=2",
          # The suite's cache (conftest): programs compiled by one launch load in the next.
          f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"]


class _Launch:
  """launch/local_multiprocess.sh 2 ... in its own process group; pids of both processes."""

  def __init__(self, workdir, name, *flags):
    self.logs = workdir / f"logs_{name}"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    # The suite's LLVM level (conftest); the launcher adds its own device count.
    env.update(PYTHON=sys.executable, PYTHONPATH=ROOT, SODA_LOG_DIR=str(self.logs),
               SODA_LOCAL_DEVICES=str(FSDP),
               XLA_FLAGS=f"{LEVEL}={cpu_devices.xla_flag_value(LEVEL) or 0}")
    self.proc = subprocess.Popen(
        ["bash", LAUNCH, "2", "configs/tiny.py", f"--workdir={workdir}", *COMMON, *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    self.pids = [int(self.proc.stdout.readline().split()[-1]) for _ in range(2)]

  def log(self, i):
    path = self.logs / f"process_{i}.log"
    return path.read_text() if path.exists() else ""

  def wait(self, timeout=TIMEOUT):
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"timed out; logs:\n{self.log(0)[-3000:]}\n{self.log(1)[-3000:]}")

  def kill(self):
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait(timeout=60)

  def wait_until(self, predicate, what):
    deadline = time.time() + TIMEOUT
    while not predicate():
      if self.proc.poll() is not None or time.time() > deadline:
        self.kill()
        raise AssertionError(f"never saw {what}; logs:\n{self.log(0)[-3000:]}")
      time.sleep(0.2)


def _params(workdir, step):
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  params = jax.device_get(ckpt.restore_raw(step)["params"])
  ckpt.close()
  return params


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SODA_MULTIPROCESS_TEST") == "0", reason=(
    "SODA_MULTIPROCESS_TEST=0 (a local opt-out; CI runs it): 89 s alone on a 2-core AMD EPYC "
    "(docs/benchmarks.md, 'Session 34')"))
def test_two_processes_straight_sigterm_kill_resume_and_samples(tmp_path):
  # (a) + (d): straight run with an end-of-run sample grid.
  a = tmp_path / "a"
  # 64 samples: the grid's sampler is then the same program as the eval's 64 reconstructions.
  run = _Launch(a, "a", f"--config.num_train_steps={STEPS}", "--config.evals.num_samples=64",
                "--config.evals.probe_every_steps=0")
  assert run.wait() == 0, run.log(0)[-3000:] + run.log(1)[-3000:]
  assert checkpointing.steps_on_disk(a) == [2, 4, 6]  # keep_checkpoints=3
  assert os.listdir(a / "samples") == [f"recon_{STEPS:07d}.png"]
  assert "Wrote /" in run.log(0) and "Wrote /" not in run.log(1)
  # The end-of-run probe (features encoded over the 4-device mesh, probes fitted on each
  # process) prints its table on process 0 only.
  assert f"SODA after {STEPS} steps" in run.log(0) and "SODA after" not in run.log(1)
  assert "process 1/2" in run.log(1) and f"Mesh {{'data': 2, 'fsdp': {FSDP}}}" in run.log(0)
  assert len([f for f in os.listdir(a) if f.startswith("events.out")]) == 1  # process 0 only
  # The state after real steps on the 2-process (2, 2) mesh was saved in the rules' layout:
  # FSDP-split kernels, their Adam moments and EMA copies; small ones whole on every device.
  ckpt = checkpointing.Checkpointer(str(a), async_save=False)
  meta = ckpt.array_metadata(STEPS)
  ckpt.close()
  layout = meta["params"]["encoder"]["layer4_1"]["conv2"]["kernel"].sharding
  assert list(layout.shape) == [2, FSDP] and list(layout.axis_names) == ["data", "fsdp"], layout
  check_rule_layout((meta["params"], meta["opt_state"][1][0]["mu"], meta["ema_params"]), FSDP,
                    lambda m: m.sharding.partition_spec, lambda m: m.storage.chunk_shape)

  # (c): SIGTERM to process 1 only, as soon as both train -> both stop at the same step s,
  # save it and exit 0. The schedule is constant after warm-up (tiny.py), so a run told
  # 100000 steps and one told STEPS take the same steps: the same run continues below.
  c = tmp_path / "c"
  run = _Launch(c, "c1", "--config.num_train_steps=100000", "--config.evals.num_samples=0")
  run.wait_until(lambda: "Starting the training loop" in run.log(0)
                 and "Starting the training loop" in run.log(1), "the training loop")
  os.kill(run.pids[1], signal.SIGTERM)
  assert run.wait() == 0, run.log(0)[-3000:] + run.log(1)[-3000:]
  stopped = max(checkpointing.steps_on_disk(c))
  # SIGTERM lands while the first step is still being loaded (~5 s), so the agreed step is
  # early, and (b) needs a later checkpoint before STEPS.
  assert stopped <= STEPS - 4, checkpointing.steps_on_disk(c)
  for i in (0, 1):
    assert f"Preemption agreed by all processes at step {stopped}" in run.log(i), run.log(i)
    assert f"Stopping at step {stopped}" in run.log(i)

  # (b): the restart resumes there on both processes; both are SIGKILLed once a newer
  # checkpoint is on disk; the next restart finishes: params bitwise equal to (a)'s.
  flags = [f"--config.num_train_steps={STEPS}", "--config.evals.num_samples=0"]
  run = _Launch(c, "c2", *flags)
  run.wait_until(lambda: max(checkpointing.steps_on_disk(c)) > stopped,
                 "a checkpoint after the restart")
  for pid in run.pids:
    os.kill(pid, signal.SIGKILL)
  run.wait()
  for i in (0, 1):
    assert f"Resumed from step {stopped}" in run.log(i), run.log(i)[-3000:]
    # Every process loads the train step that process 0 cached in (a): no recompiles on
    # restart (multihost.share_cpu_compilation_cache).
    assert "train_step: loaded from the persistent cache in" in run.log(i), run.log(i)[-3000:]
  killed_at = max(checkpointing.steps_on_disk(c))
  assert killed_at < STEPS, checkpointing.steps_on_disk(c)
  run = _Launch(c, "c3", *flags)
  assert run.wait() == 0, run.log(0)[-3000:]
  assert f"Resumed from step {killed_at}" in run.log(0)
  jax.tree.map(np.testing.assert_array_equal, _params(a, STEPS), _params(c, STEPS))


@pytest.mark.parametrize("script,env,args,expected", [
    ("local_multiprocess.sh",
     {"SODA_COORDINATOR_PORT": "1234", "PYTHON": "python", "XLA_FLAGS": ""},
     ["--dry_run", "2", "configs/tiny.py", "--workdir=/w"],
     [["env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m "
       "soda_jax.main --config=configs/tiny.py --coordinator_address=127.0.0.1:1234 "
       "--num_processes=2 --process_id=0 --workdir=/w"],
      ["--coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id=1 --workdir=/w"]]),
    ("local_multiprocess.sh",  # the caller's XLA flags are kept, the device count added
     {"SODA_COORDINATOR_PORT": "1", "SODA_LOCAL_DEVICES": "2", "PYTHON": "python",
      "XLA_FLAGS": "--xla_backend_optimization_level=1"},
     ["--dry_run", "1", "configs/tiny.py", "--workdir=/w"],
     [[r"XLA_FLAGS=--xla_backend_optimization_level=1\ --xla_force_host_platform_device_count=2"
       " python -m soda_jax.main"]]),
    ("single_gpu.sh", {}, ["--dry_run", "configs/cifar10.py", "/w", "--config.batch_size=8"],
     [["python -m soda_jax.main --config=configs/cifar10.py --workdir=/w --config.batch_size=8"]]),
    ("gpu_slurm.sh", {}, ["--dry_run", "configs/imagenet.py", "/w", "/tfds", "--config.seed=1"],
     [["export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"],
      ["srun python -m soda_jax.main --config=configs/imagenet.py --workdir=/w --distributed "
       "--config.data.tfds_data_dir=/tfds --config.seed=1"]]),
    ("tpu_pod.sh", {"TPU_NAME": "pod", "ZONE": "z", "WORKDIR": "gs://b/w", "TFDS_DIR": "gs://b/t",
                    "REPO": "https://example.com/soda.git"},
     ["--dry_run", "configs/imagenet.py", "--config.seed=1"],
     [["gcloud compute tpus tpu-vm ssh pod --zone z --worker=all --command",
       "git clone https://example.com/soda.git soda_jax",
       "SODA_DISTRIBUTED=1 python -m soda_jax.main --config=configs/imagenet.py "
       "--workdir=gs://b/w", "--config.data.tfds_data_dir=gs://b/t --config.seed=1"]]),
])
def test_launcher_dry_run_prints_commands(script, env, args, expected):
  """Each launcher's --dry_run prints exactly the commands it would run (one per line)."""
  env = dict({k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"},
             **env)
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60,
                       check=True).stdout.strip().splitlines()
  assert len(out) == len(expected), out
  for line, parts in zip(out, expected):
    for part in parts:
      assert part in line, (part, line)


def test_tpu_pod_remote_command_keeps_each_argument_one_word():
  """An override with shell syntax in it ('(8,4)') reaches the workers' python as one argv
  word: the remote command is valid bash and its python line, run with python stubbed to print
  its arguments, prints each one intact."""
  env = dict(os.environ, TPU_NAME="pod", ZONE="z", WORKDIR="gs://b/my w", TFDS_DIR="gs://b/t",
             REPO="https://example.com/soda.git")
  args = ["--config.mesh.shape=(8,4)", "--config.data.split=train[:90%]", "--config.seed=1"]
  line = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry_run",
                         "configs/imagenet.py", *args], env=env, capture_output=True,
                        text=True, timeout=60, check=True).stdout.strip()
  # The printed gcloud argv, parsed back by bash; its last word is the remote command.
  remote = subprocess.run(["bash", "-c", f'eval "set -- {line}"; printf %s "${{@: -1}}"'],
                          capture_output=True, text=True, timeout=60, check=True).stdout
  subprocess.run(["bash", "-n", "-c", remote], check=True, timeout=60)  # valid syntax
  python_line = remote[remote.index("SODA_DISTRIBUTED=1"):]
  argv = subprocess.run(["bash", "-c", "python() { printf '%s\\n' \"$@\"; }; " + python_line],
                        capture_output=True, text=True, timeout=60, check=True).stdout
  assert argv.splitlines() == ["-m", "soda_jax.main", "--config=configs/imagenet.py",
                               "--workdir=gs://b/my w", "--config.data.tfds_data_dir=gs://b/t",
                               *args]
