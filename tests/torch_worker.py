"""One torch process for the export tests' torch side: `torch_resnet.main(args)` for each JSON
list of arguments read from stdin, one JSON reply per line on a private copy of stdout.

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
import traceback

from soda_jax.export import torchvision as tv


class TorchWorker:
  """`run(*args)`: what `torchvision.run_torch(*args)` returns, from one long-lived process."""

  def __init__(self):
    self._proc = subprocess.Popen([sys.executable, "-m", "tests.torch_worker"],
                                  env=tv.torch_process_env(), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

  def run(self, *args: str) -> str:
    if self._proc.poll() is not None:
      raise RuntimeError(f"the torch worker exited (code {self._proc.returncode}) before {args}")
    self._proc.stdin.write(json.dumps(list(args)) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    try:
      reply = json.loads(line)
    except json.JSONDecodeError:
      self._proc.kill()  # out of step with its replies: no later call may read this one
      raise RuntimeError(f"the torch worker answered {line[:200]!r} to {args} "
                         f"(exit code {self._proc.wait()})") from None
    if "error" in reply:
      raise RuntimeError(f"torch_resnet {' '.join(args)} failed:\n{reply['error']}")
    return reply["stdout"]

  def close(self):
    try:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)
    finally:
      if self._proc.poll() is None:
        self._proc.kill()
        self._proc.wait()


def _serve():
  # Replies go to a copy of fd 1; fd 1 itself then points at stderr, so nothing torch, its C++
  # side or a child process writes there can fall between two replies.
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  from soda_jax.export import torch_resnet  # pylint: disable=g-import-not-at-top
  for line in sys.stdin:
    out = io.StringIO()
    try:
      with contextlib.redirect_stdout(out):
        torch_resnet.main(json.loads(line))
      reply = {"stdout": out.getvalue()}
    except BaseException:  # pylint: disable=broad-except  (SystemExit too: a bad command)
      reply = {"error": traceback.format_exc()}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


if __name__ == "__main__":
  _serve()
