"""The soak tool's argument checks (its run is measured in docs/benchmarks.md, not tested here:
twenty restarts of a training run do not fit the suite)."""
import re

import pytest

from soda_jax.tools import soak


@pytest.mark.parametrize("argv,message", [
    (["--workdir=/w", "--kills=2", "--lr=3"], r"unknown arguments \['--lr=3'\]"),
    (["--workdir=/w", "--kills=0"], r"--kills=0, --steps=120 and --checkpoint_every=6 must be"),
    (["--workdir=/w", "--steps=-1"], r"--steps=-1"),
])
def test_bad_arguments_are_named(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    soak.main(["--config=configs/tiny.py", *argv])
  assert e.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_refuses_a_workdir_with_checkpoints(tmp_path, capsys):
  (tmp_path / "soak" / "checkpoints" / "6").mkdir(parents=True)
  with pytest.raises(SystemExit):
    soak.main(["--config=configs/tiny.py", f"--workdir={tmp_path}"])
  assert "already has checkpoints: use a new --workdir" in capsys.readouterr().err
