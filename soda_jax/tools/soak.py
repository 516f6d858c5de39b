"""Reliability soak: SIGKILL one training run at random moments, restart it each time, and check
that it ends bitwise equal to an uninterrupted run of the same config.

  python -m soda_jax.tools.soak --config=configs/tiny.py --workdir=/tmp/soak --kills=20 \
      [--steps=120] [--checkpoint_every=6] [--seed=0] [--config.key=value ...]

workdir/reference: the uninterrupted run (timed). workdir/soak: the same command, killed
`--kills` times (the first right after its first checkpoint, to time a warm start-up; the others
after a random delay between 1 s and that start-up plus 1.5x the reference's time for
steps/kills steps, so kills land during start-up, restore, compiling, training and asynchronous
saves alike, and the run outlasts them), then run to the end. Every kill is logged with the
newest complete checkpoint and whether a save was in flight (an Orbax temporary directory
written since that launch). The whole saved train state of the final step
(params, EMA, optimizer state, step) is compared bitwise; the outcome goes to
workdir/soak.json. Exit code 1 if they differ or a restart fails.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from soda_jax import checkpointing


def _saving(workdir: str, since: float) -> bool:
  """Whether a save was in flight: an Orbax temporary step directory written since `since` (one
  left over from an earlier kill is older, and is replaced when that step is saved again)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return False
  for s in os.listdir(d):
    try:
      if "tmp" in s and os.path.getmtime(os.path.join(d, s)) >= since:
        return True
    except OSError:  # renamed by a finishing save between listdir and getmtime
      continue
  return False


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--checkpoint_every", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0, help="of the kill delays")
  args, passthrough = parser.parse_known_args(argv)
  bad = [a for a in passthrough if not a.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (only --config.* pass through to soda_jax.main)")
  if args.kills < 1 or args.steps < 1 or args.checkpoint_every < 1:
    parser.error(f"--kills={args.kills}, --steps={args.steps} and "
                 f"--checkpoint_every={args.checkpoint_every} must be >= 1")

  def command(workdir):
    return [sys.executable, "-m", "soda_jax.main", f"--config={args.config}",
            f"--workdir={workdir}", f"--config.num_train_steps={args.steps}",
            f"--config.checkpoint_every_steps={args.checkpoint_every}",
            "--config.evals.num_samples=0", "--config.evals.probe_every_steps=-1",
            *passthrough]

  reference, soak = (os.path.join(args.workdir, d) for d in ("reference", "soak"))
  for d in (reference, soak):
    if checkpointing.steps_on_disk(d):
      parser.error(f"{d} already has checkpoints: use a new --workdir")
  os.makedirs(args.workdir, exist_ok=True)
  logs = open(os.path.join(args.workdir, "runs.log"), "a")  # pylint: disable=consider-using-with

  t0 = time.time()
  proc = subprocess.Popen(command(reference), stdout=logs, stderr=logs)
  first_ckpt = None  # seconds from launch to the first checkpoint: start-up + a few steps
  while proc.poll() is None:
    if first_ckpt is None and checkpointing.steps_on_disk(reference):
      first_ckpt = time.time() - t0
    time.sleep(0.2)
  ref_wall = time.time() - t0
  if proc.returncode != 0:
    print(f"the reference run failed with exit code {proc.returncode}: see {logs.name}")
    return 1
  first_ckpt = first_ckpt or ref_wall
  step_s = max(ref_wall - first_ckpt, 1e-3) / max(args.steps - args.checkpoint_every, 1)
  print(f"reference: {args.steps} steps in {ref_wall:.0f} s (~{step_s:.2f} s/step)", flush=True)

  # Kill 1 calibrates: the soak run is killed as soon as its first checkpoint is complete. Its
  # start-up (compiled programs now come from the cache) sets the other delays: up to start-up
  # + 1.5x the time of steps/kills steps, so kills land in start-up, restore, compiling,
  # training and saves, and the run outlasts all of them.
  kills = []
  t0 = time.time()
  proc = subprocess.Popen(command(soak), stdout=logs, stderr=logs)
  while proc.poll() is None and not checkpointing.steps_on_disk(soak):
    time.sleep(0.05)
  warm_start = time.time() - t0
  if proc.poll() is not None:
    print(f"the first soak launch exited ({proc.returncode}) before its first checkpoint: see "
          f"{logs.name}", flush=True)
    return 1
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  kills.append({"delay_s": round(warm_start, 1),
                "newest_checkpoint": max(checkpointing.steps_on_disk(soak), default=0),
                "save_in_flight": False})
  max_delay = warm_start + 1.5 * step_s * args.steps / args.kills
  print(f"kill 1: right after the first checkpoint ({warm_start:.1f} s); other kill delays in "
        f"[1, {max_delay:.0f}] s", flush=True)

  rng = np.random.default_rng(args.seed)
  for i in range(1, args.kills):
    delay = float(rng.uniform(1.0, max(1.5, max_delay)))
    started = time.time()
    proc = subprocess.Popen(command(soak), stdout=logs, stderr=logs)
    try:
      rc = proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)  # first: nothing below may leave the run alive
      proc.wait()
      saving = _saving(soak, started)
      kills.append({"delay_s": round(delay, 1),
                    "newest_checkpoint": max(checkpointing.steps_on_disk(soak), default=0),
                    "save_in_flight": saving})
      print(f"kill {i + 1}: after {delay:.1f} s, newest checkpoint "
            f"{kills[-1]['newest_checkpoint']}, save in flight: {saving}", flush=True)
      continue
    if rc != 0:
      print(f"restart {i + 1} failed with exit code {rc}: see {logs.name}", flush=True)
      return 1
    print(f"the run finished before kill {i + 1}", flush=True)
    break
  subprocess.run(command(soak), stdout=logs, stderr=logs, check=True)

  states = []
  for d in (reference, soak):
    ckpt = checkpointing.Checkpointer(d, async_save=False)
    states.append(ckpt.restore_raw(args.steps))
    ckpt.close()
  import jax  # pylint: disable=g-import-not-at-top
  leaves_ref = jax.tree_util.tree_flatten_with_path(states[0])[0]
  leaves_soak = jax.tree.leaves(states[1])
  diff = [jax.tree_util.keystr(p) for (p, a), b in zip(leaves_ref, leaves_soak)
          if not np.array_equal(a, b)]
  result = {"command": command(soak), "kills": kills, "reference_wall_s": round(ref_wall, 1),
            "max_delay_s": round(max_delay, 1),
            "saves_in_flight_at_kill": sum(k["save_in_flight"] for k in kills),
            "leaves": len(leaves_ref), "leaves_differing": diff,
            "bitwise_equal": not diff and len(leaves_ref) == len(leaves_soak)}
  with open(os.path.join(args.workdir, "soak.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"{len(kills)} kills ({result['saves_in_flight_at_kill']} during a save); final state "
        f"{'bitwise equal' if result['bitwise_equal'] else 'DIFFERS'} to the reference "
        f"({len(leaves_ref)} arrays{'' if not diff else ', differing: ' + ', '.join(diff[:5])})",
        flush=True)
  return 0 if result["bitwise_equal"] else 1


if __name__ == "__main__":
  sys.exit(main())
