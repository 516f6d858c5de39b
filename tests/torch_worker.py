"""One torch process for the export tests' torch side: `torch_resnet.main(args)` for each JSON
list of arguments read from stdin, one JSON reply per line on stdout.

`torchvision.run_torch` (what the exports and the notebook use) starts a fresh process per call,
~5 s of importing torch and torchvision on 2 cores; the tests make seven such calls, which this
process answers after one import. `TorchWorker` is its client.
"""
import contextlib
import io
import json
import os
import subprocess
import sys


class TorchWorker:
  """`run(*args)`: what `torchvision.run_torch(*args)` returns, from one long-lived process."""

  def __init__(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    self._proc = subprocess.Popen([sys.executable, "-m", "tests.torch_worker"], cwd=root,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)

  def run(self, *args: str) -> str:
    self._proc.stdin.write(json.dumps(list(args)) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch worker exited (code {self._proc.wait()}) on {args}")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"torch_resnet {' '.join(args)} failed:\n{reply['error']}")
    return reply["stdout"]

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


def _serve():
  from soda_jax.export import torch_resnet  # pylint: disable=g-import-not-at-top
  replies = sys.stdout
  for line in sys.stdin:
    out = io.StringIO()
    try:
      with contextlib.redirect_stdout(out):
        torch_resnet.main(json.loads(line))
      reply = {"stdout": out.getvalue()}
    except BaseException as e:  # pylint: disable=broad-except  (SystemExit too: a bad command)
      reply = {"error": f"{type(e).__name__}: {e}"}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


if __name__ == "__main__":
  _serve()
