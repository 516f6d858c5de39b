"""Checkpoints that cannot be used fail with a message, not a TensorStore traceback:
damaged newest step -> the newest intact one; another config -> the keys that differ."""
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from soda_jax import checkpointing, config_base, train, train_step as ts
from soda_jax.data import pipeline
from tests import traces
from tests.test_config_checks import ROOT, load_config

# The tiny runs (this module's fixture, resume, SIGTERM, the quickstart notebook) share one xdist
# worker: tiny.py's train step does not depend on the run length, so one compile serves them all.
pytestmark = pytest.mark.xdist_group("tiny_train")

OLD, NEW = 2, 4  # the checkpointed steps of the shared run


def _tiny(**overrides):
  return config_base.override(load_config("tiny"), {
      "num_train_steps": NEW, "checkpoint_every_steps": OLD, "log_every_steps": OLD,
      "evals.num_samples": 0, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with checkpoints at steps OLD and NEW (one run, shared by the tests below)."""
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(_tiny(), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == [str(OLD), str(NEW)]
  return workdir


def _abstract(config):
  model, tx = ts.build_model(config), ts.make_optimizer(config)
  from soda_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config)
  return ts.abstract_state(model, tx, config, mesh, jax.random.PRNGKey(0))[0]


def _damage(step_dir, how):
  files = sorted(f for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
                 if os.path.getsize(f) > 1000)
  assert files
  rng = np.random.default_rng(0)
  for f in files:
    size = os.path.getsize(f)
    if how == "truncate":
      os.truncate(f, size // 2)
    elif how == "delete":
      os.remove(f)
    elif how == "garble":
      with open(f, "r+b") as fh:
        fh.seek(size // 4)
        fh.write(rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes())
  if how == "config":
    with open(step_dir / "config" / "metadata", "w") as fh:
      fh.write('{"model": {"latent_dim": ')
  if how == "metadata":  # Orbax reads a missing array index as "no arrays", not as an error
    os.remove(step_dir / "state" / "_METADATA")


@pytest.mark.parametrize("how", ["truncate", "delete", "garble", "config", "metadata"])
def test_damaged_newest_checkpoint_falls_back_to_intact_one(trained, tmp_path, how, caplog):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  _damage(workdir / "checkpoints" / str(NEW), how)
  config = _tiny()
  abstract = _abstract(config)
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  expected = ckpt.restore_raw(OLD)["params"]
  # Asked for explicitly, the damaged step is a one-line error naming it.
  with pytest.raises(checkpointing.DamagedCheckpointError) as e:
    ckpt.restore(NEW, abstract, config=config)
  assert str(e.value).startswith(f"Checkpoint step {NEW} in {workdir}/checkpoints is damaged")
  assert "\n" not in str(e.value)
  data_iter = pipeline.make_train_iterator(config, seed=config.seed)
  with caplog.at_level(logging.WARNING):
    step, state = ckpt.restore_latest(abstract, data_iter, config)
  assert step == OLD and int(state.step) == OLD
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), expected)
  messages = [r.getMessage() for r in caplog.records]
  assert any(f"Checkpoint step {NEW} in" in m and "is damaged" in m for m in messages), messages
  # The damaged step is moved aside (kept), so the run can save that step number again.
  assert checkpointing.steps_on_disk(workdir) == [OLD]
  assert os.path.isdir(workdir / "checkpoints_damaged" / str(NEW))
  assert any("Moved the damaged checkpoint step" in m for m in messages), messages
  ckpt.close()
  if how == "truncate":  # resume through the damaged step's number: saved again, intact
    with traces.traced_functions() as traced:
      out = train.train_and_evaluate(config, str(workdir))
    assert out["step"] == NEW and checkpointing.steps_on_disk(workdir) == [OLD, NEW]
    # The fixture's run built this config's programs in this process (ts.programs): the resumed
    # run traces neither the train step nor the init again, and ends bitwise where the
    # uninterrupted run did.
    assert "train_step" not in traced and "_init_state" not in traced, traced
    straight = checkpointing.Checkpointer(str(trained), async_save=False)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(out["state"].params),
                 straight.restore_raw(NEW)["params"])
    straight.close()


def test_checkpoint_of_another_process_count_is_named(trained, tmp_path):
  """A 2-process run's checkpoint resumed by one process: its per-process input position
  cannot be restored; said in one line, not read as damage (which would skip every step)."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  for step in (OLD, NEW):
    data = workdir / "checkpoints" / str(step) / "data"
    os.rename(data / "process_0-of-1.json", data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
  config = _tiny()
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore_latest(_abstract(config), pipeline.make_train_iterator(config, seed=0), config)
  ckpt.close()
  assert not isinstance(e.value, checkpointing.DamagedCheckpointError)
  assert str(e.value).startswith(f"Checkpoint step {NEW} in {workdir}/checkpoints was written "
                                 "by 2 processes and this run has 1")
  assert checkpointing.steps_on_disk(workdir) == [OLD, NEW]  # nothing moved


def test_checkpoint_from_another_config_names_the_keys(trained):
  config = _tiny(**{"model.latent_dim": 11, "num_train_steps": 2 * NEW})
  ckpt = checkpointing.Checkpointer(str(trained), async_save=False)
  with pytest.raises(checkpointing.ConfigMismatchError) as e:
    ckpt.restore_latest(_abstract(config), None, config)
  ckpt.close()
  msg = str(e.value)
  assert f"Checkpoint step {NEW} in" in msg
  assert "config.model.latent_dim: checkpoint has 24, this run has 11" in msg
  assert "arrays differ in shape" in msg
  assert "num_train_steps" not in msg  # harmless differences are not listed


def test_checkpoint_from_before_a_key_existed_resumes_at_its_default(trained, tmp_path):
  """A key added to the schema after the checkpoint was written is no difference at its default
  (the old behaviour), and is one at any other value."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  meta = workdir / "checkpoints" / str(NEW) / "config" / "metadata"
  saved = json.loads(meta.read_text())
  # As if written before model.latent_act existed (its default 'none' is the old behaviour).
  assert saved["model"].pop("latent_act") == "none"
  meta.write_text(json.dumps(saved))
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  config = _tiny()
  ckpt.check_compatible(NEW, _abstract(config), config)  # no error
  other = _tiny(**{"model.latent_act": "silu"})
  with pytest.raises(checkpointing.ConfigMismatchError) as e:
    ckpt.check_compatible(NEW, _abstract(other), other)
  ckpt.close()
  assert "config.model.latent_act: checkpoint has '<absent>', this run has 'silu'" in str(e.value)


def _run(module, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # conftest's XLA_FLAGS
  return subprocess.run([sys.executable, "-m", module, "--config=configs/tiny.py", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_message_without_traceback(trained, tmp_path):
  """evaluate --step=NEW of a damaged step; main on another config's checkpoint."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  _damage(workdir / "checkpoints" / str(NEW), "truncate")
  p = _run("soda_jax.evaluate", f"--workdir={workdir}", f"--step={NEW}")
  assert p.returncode != 0
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  assert f"Error: Checkpoint step {NEW} in {workdir}/checkpoints is damaged" in p.stderr
  p = _run("soda_jax.main", f"--workdir={trained}", "--config.model.latent_dim=11")
  assert p.returncode != 0
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "config.model.latent_dim: checkpoint has 24, this run has 11" in p.stderr
