"""Times one 3x3 conv's forward and its weight gradient, XLA's against the L2-sized chunks of
`models/convolution.py`, on this machine: the op-level evidence for the chunk rule.

python -m soda_jax.tools.conv_bench --shapes=16x32x128x128,16x16x256x256 [--budget=BYTES]
Each shape is N x side x Cin x Cout (NHWC input, SAME padding, stride 1, float32), on one
device (run it under `taskset -c 0` for one core, as docs/benchmarks.md's session-25 table).
Prints a markdown table (median of --reps jitted calls, ms) and, with --json, writes every field.
"""
import json
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from soda_jax.models import convolution
from soda_jax.tools import benchmark

_DN = ("NHWC", "HWIO", "NHWC")
_PADS = ((1, 1), (1, 1))


def parse_shape(text: str) -> tuple:
  parts = text.lower().split("x")
  if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"shape {text!r}: expected N x side x Cin x Cout, e.g. 16x32x128x128")
  return tuple(int(p) for p in parts)


def _median_ms(fn, *args, reps: int) -> float:
  """Median wall ms of `reps` calls after one untimed (compiling) call."""
  times, _ = benchmark._time_calls(  # pylint: disable=protected-access
      lambda: jax.block_until_ready(fn(*args)), reps, warmup=1)
  return float(np.median(times)) * 1e3


def measure(shape: Sequence[int], budget: int = 0, reps: int = 7) -> Dict[str, Any]:
  """Forward, XLA's weight gradient and the chunked one for one shape, plus their difference."""
  n, side, cin, cout = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (n, side, side, cin))
  w = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.05
  g = jax.random.normal(keys[2], (n, side, side, cout))
  shards, chunk = convolution.weight_grad_chunks(x.shape, w.shape, (1, 1), _PADS, x.dtype,
                                                 budget)

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), _PADS, dimension_numbers=_DN)

  def xla_wgrad(x, w, g):
    return jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0]

  def chunked_wgrad(x, w, g):
    return convolution.chunked_weight_grad(x, g, w, (1, 1), _PADS, None, shards, chunk)

  want = jax.jit(xla_wgrad)(x, w, g)
  got = jax.jit(chunked_wgrad)(x, w, g)
  row = dict(shape=list(shape), shards=shards, chunk=chunk,
             per_example_bytes=convolution.per_example_bytes(x.shape, w.shape, (1, 1), _PADS,
                                                             x.dtype),
             budget_bytes=budget or convolution.l2_bytes(),
             forward_ms=_median_ms(jax.jit(conv), x, w, reps=reps),
             xla_weight_grad_ms=_median_ms(jax.jit(xla_wgrad), x, w, g, reps=reps),
             chunked_weight_grad_ms=_median_ms(jax.jit(chunked_wgrad), x, w, g, reps=reps),
             max_rel_diff=float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
  return row


def format_table(rows: List[Dict[str, Any]]) -> str:
  lines = ["| N x side x Cin x Cout | chunk | forward ms | XLA weight grad ms | chunked ms | "
           "max rel diff |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['chunk']} of {r['shape'][0] // r['shards']}"
                 f" | {r['forward_ms']:.1f} | {r['xla_weight_grad_ms']:.1f} | "
                 f"{r['chunked_weight_grad_ms']:.1f} | {r['max_rel_diff']:.1e} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  shapes = [parse_shape(s) for s in f.shapes.split(",")]  # every shape checked before any compile
  if f.budget < 0 or f.reps < 1:
    raise ValueError(f"--budget={f.budget} must be >= 0 and --reps={f.reps} >= 1")
  print(f"{jax.device_count()} x {jax.devices()[0].platform}, L2 budget "
        f"{f.budget or convolution.l2_bytes()} bytes")
  rows = []
  for shape in shapes:
    rows.append(measure(shape, f.budget, f.reps))
    print(format_table(rows[-1:]).splitlines()[-1], flush=True)  # progress, one row per shape
  print(format_table(rows))
  if f.json:
    with open(f.json, "w") as fp:
      json.dump(rows, fp, indent=2)
    print(f"wrote {f.json}")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("shapes", "16x32x128x128,16x32x256x256,16x16x256x256",
                      "Comma-separated N x side x Cin x Cout.")
  flags.DEFINE_integer("budget", 0, "Chunk budget in bytes (0: SODA_CONV_L2_BYTES or the L2).")
  flags.DEFINE_integer("reps", 7, "Timed calls per op (median).")
  flags.DEFINE_string("json", None, "Write the rows here.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
