"""TensorBoard events without TensorFlow: what is written reads back (values, steps, pixels)."""
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from soda_jax import metric_writer
from tests.test_config_checks import ROOT


def _events(logdir):
  """The summaries of the one event file, read as TensorBoard reads it without TensorFlow
  (its stub reader checks every record's CRC; the TF-backed loader would import TF: ~10 s)."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
  (name,) = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents")]
  reader = pywrap_tensorflow.PyRecordReader_New(os.path.join(logdir, name).encode())
  events = []
  while True:
    try:
      reader.GetNext()
    except errors.OutOfRangeError:
      return [e for e in events if e.HasField("summary")]
    events.append(event_pb2.Event.FromString(reader.record()))


def test_scalars_and_images_read_back(tmp_path):
  w = metric_writer.create(str(tmp_path), process_index=0)
  w.write_scalars(3, {"loss": np.float32(0.25), "lr": 1e-3})
  gray = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5, 1) * 5  # two images -> name/i
  rgb = np.linspace(0, 1, 4 * 5 * 3, dtype=np.float32).reshape(1, 4, 5, 3)
  w.write_images(7, {"grid": gray, "rgb": rgb})
  w.close()
  scalars, images = _events(tmp_path)
  assert scalars.step == 3
  assert {v.tag: v.simple_value for v in scalars.summary.value} == {
      "loss": 0.25, "lr": pytest.approx(1e-3)}
  assert images.step == 7
  got = {v.tag: np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
         for v in images.summary.value}
  assert sorted(got) == ["grid/0", "grid/1", "rgb"]
  np.testing.assert_array_equal(got["grid/1"], gray[1, ..., 0])
  np.testing.assert_array_equal(got["rgb"], np.round(rgb[0] * 255).astype(np.uint8))
  assert [(v.image.height, v.image.width, v.image.colorspace)
          for v in images.summary.value] == [(4, 5, 1), (4, 5, 1), (4, 5, 3)]


def test_other_processes_only_log(tmp_path):
  w = metric_writer.create(str(tmp_path), process_index=1)
  w.write_scalars(1, {"loss": 1.0})
  w.write_images(1, {"grid": np.zeros((1, 2, 2, 3), np.uint8)})
  w.close()
  assert not os.listdir(tmp_path)


def test_bad_image_shape_names_it(tmp_path):
  w = metric_writer.create(str(tmp_path), process_index=0)
  with pytest.raises(ValueError, match=r"'grid'.*\(4, 4, 3\)"):
    w.write_images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
  w.close()


def test_progress_reports_rate_at_the_last_step(tmp_path):
  w = metric_writer.create(str(tmp_path), process_index=0)
  report = metric_writer.ProgressReport(num_train_steps=5, writer=w, every_secs=3600.0)
  for step in range(1, 6):  # the first call only starts the clock (it includes compiling)
    report(step)
  w.close()
  (event,) = _events(tmp_path)
  assert event.step == 5
  values = {v.tag: v.simple_value for v in event.summary.value}
  assert sorted(values) == ["steps_per_sec", "uptime"] and values["steps_per_sec"] > 0


def test_the_training_run_does_not_import_tensorflow():
  # TensorFlow costs ~7 s of every process start on 2 cores (soda_jax/metric_writer.py).
  code = ("import sys, soda_jax.main, soda_jax.train; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert out.strip() == "[]", out


def test_writing_events_does_not_import_tensorflow(tmp_path):
  code = ("import sys; import numpy as np; from soda_jax import metric_writer; "
          f"w = metric_writer.create({str(tmp_path)!r}, 0); w.write_scalars(1, {{'a': 1.0}}); "
          "w.write_images(1, {'g': np.zeros((1, 2, 2, 3), np.uint8)}); w.close(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert out.strip() == "[]", out
  assert len(_events(tmp_path)) == 2
