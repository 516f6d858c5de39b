"""The Colab notebooks run top to bottom (at smoke size): every code cell, in order."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each notebook's smoke config is one other tests train (tests/test_export.py's R18, tiny.py):
# the same xdist worker runs them, so their programs come from the compilation cache.
_GROUPS = {"export.ipynb": "export", "soda_quickstart.ipynb": "tiny_train",
           "explore.ipynb": "tiny_train"}


def test_package_is_installed_where_the_notebooks_find_it(tmp_path):
  """The notebooks import soda_jax as an installed package (README: `pip install -e .`), from any
  directory, and find configs/ beside it: the editable install points at this checkout."""
  out = subprocess.run(
      [sys.executable, "-c", "import soda_jax; print(soda_jax.__file__)"], cwd=tmp_path,
      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True,
      text=True, check=False)
  assert out.returncode == 0, f"soda_jax is not installed (pip install -e .):\n{out.stderr[-500:]}"
  assert os.path.dirname(os.path.dirname(os.path.abspath(out.stdout.strip()))) == ROOT, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(f, marks=pytest.mark.xdist_group(_GROUPS.get(f, f)))
    for f in sorted(os.listdir(os.path.join(ROOT, "colabs"))) if f.endswith(".ipynb")])
def test_notebook_runs(name, monkeypatch, tmp_path):
  monkeypatch.setenv("SODA_COLAB_SMOKE", "1")
  monkeypatch.chdir(ROOT)
  with open(os.path.join(ROOT, "colabs", name)) as f:
    nb = json.load(f)
  if name == "export.ipynb" and not importlib.util.find_spec("torchvision"):
    pytest.skip("torch/torchvision not importable (pip install -r requirements-test.txt)")
  scope = {"__name__": "__colab__"}
  for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
    src = "".join(cell["source"]).replace("/tmp/soda_colab", str(tmp_path))
    assert "sys.path" not in src, f"{name}[cell {i}]: import the installed package (pip install -e .)"
    exec(compile(src, f"{name}[cell {i}]", "exec"), scope)  # pylint: disable=exec-used
  if name == "explore.ipynb":
    assert sorted(os.path.basename(p) for p in scope["written"]) == [
        "guidance_w_z.png", "interpolation.png", "novel_views.png", "subvector_swaps.png",
        "subvector_traversals.png"]
    # The interpolation's ends are the pairs' own latents: the swap figure decodes the same
    # latents with the same noise, so its outer columns are the same images.
    interp, swaps = scope["interp_columns"], scope["swap_columns"]
    assert len(swaps) == scope["model"].num_subvectors + 2
    np.testing.assert_array_equal(np.asarray(interp[0]), np.asarray(swaps[0]))
    np.testing.assert_array_equal(np.asarray(interp[-1]), np.asarray(swaps[-1]))
    # Traversals: a column per step, a row per sub-vector; moving sub-vector k changes row k.
    walk = [np.asarray(c) for c in scope["walk_columns"]]
    assert len(walk) == len(scope["STEPS"]) and walk[0].shape[0] == scope["rows"]
    zero = scope["STEPS"].index(0.0)
    for k in range(scope["rows"]):
      assert np.abs(walk[0][k] - walk[zero][k]).max() > 0, k
    return
  if name == "export.ipynb":  # torch features match soda_jax's; safetensors round trip bitwise
    r = scope["export_result"]
    assert r["round_trip_bitwise"] and max(r["err_h"], r["err_z"]) < 1e-4, r
    return
  assert "probe_top1_h" in scope["result"]["eval"]
  assert os.path.exists(os.path.join(tmp_path, "colab_recon.png"))
