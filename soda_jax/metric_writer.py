"""Scalars and images to the log and to TensorBoard event files, without importing TensorFlow.

clu's `metric_writers` (and `periodic_actions`, which imports it) load TensorFlow for their
summary writer: `import soda_jax.main, soda_jax.train` took 6.7-6.8 s with it and 1.5-1.6 s
without (2-core AMD EPYC, quiet, docs/benchmarks.md "Test suite"), paid by every
`python -m soda_jax.main`, every process of a multi-host job and every test that starts one.
This module keeps clu's writer interface
(`write_scalars`, `write_images`, `flush`, `close`) and writes the event records with
TensorBoard's own pure-Python framing (protobuf + CRC, as tensorboardX and PyTorch do), the way
big_vision and MaxText keep their own small writers. Files are opened through etils.epath, as
Orbax opens them (local paths without TensorFlow; gs:// too): TensorBoard's `EventFileWriter`
opens them through `tensorboard.compat.tf`, which imports TensorFlow whenever it is installed.
"""
import io
import os
import socket
import time
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter  # pure Python, CRC framing


class MetricWriter:
  """`[step] key=value` log lines on every process; TensorBoard events where `logdir` is set."""

  def __init__(self, logdir: Optional[str] = None):
    self._events = None
    if logdir is not None:
      path = epath.Path(logdir)
      path.mkdir(parents=True, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"
      self._events = RecordWriter((path / name).open("wb"))
      self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    if self._events is not None:
      self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=v)
                       for k, v in values.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> [N, H, W, C] (C in 1, 3, 4), uint8 or float in [0, 1]; N > 1 -> name/i."""
    shapes = {k: np.shape(v) for k, v in images.items()}
    logging.info("[%d] Got images: %s.", step, shapes)
    for name, shape in shapes.items():
      if len(shape) != 4 or shape[-1] not in (1, 3, 4):
        raise ValueError(f"write_images({name!r}): shape {shape} is not [N, H, W, C] with C in "
                         "(1, 3, 4)")
    if self._events is None:
      return
    values = []
    for name, batch in images.items():
      batch = np.asarray(batch)
      for i, image in enumerate(batch):
        png, (h, w, c) = _png(image), image.shape
        tag = name if len(batch) == 1 else f"{name}/{i}"
        values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            height=h, width=w, colorspace=c, encoded_image_string=png)))
    self._add(step, values)

  def _add(self, step, values):
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def _write(self, event):
    self._events.write(event.SerializeToString())
    self._events.flush()  # a few records per log step: TensorBoard sees them at once

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _png(image: np.ndarray) -> bytes:
  if image.dtype != np.uint8:
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def create(workdir: str, process_index: int) -> MetricWriter:
  """Process 0 writes TensorBoard events into `workdir`; every process logs."""
  return MetricWriter(workdir if process_index == 0 else None)


class ProgressReport:
  """Every `every_secs` (and at the last step): steps/s, % done and ETA in the log, and
  `steps_per_sec` / `uptime` scalars, as clu's `ReportProgress` did.

  Host-side timing: the host runs at most a few dispatched steps ahead of the device (the loop
  fetches metrics every `log_every_steps`), so over a minute the rate is the device's.
  """

  def __init__(self, num_train_steps: int, writer: MetricWriter, every_secs: float = 60.0):
    self._total, self._writer, self._every = num_train_steps, writer, every_secs
    self._t0 = time.monotonic()
    self._last = None  # (step, time) of the last report, or of the first call

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._last is None:  # the first step includes compiling: measure from here
      self._last = (step, now)
      return
    last_step, last_t = self._last
    if now - last_t < self._every and step != self._total:
      return
    rate = (step - last_step) / max(now - last_t, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else float("inf")
    logging.info("%.3g steps/s, %.1f%% (%d/%d), ETA %dm", rate, 100.0 * step / self._total,
                 step, self._total, int(eta // 60) if np.isfinite(eta) else -1)
    self._writer.write_scalars(step, {"steps_per_sec": rate, "uptime": now - self._t0})
    self._last = (step, now)
