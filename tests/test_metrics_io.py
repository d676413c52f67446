"""metrics.jsonl / TensorBoard writer: a resumed run drops the rows and hides the events an interrupted run logged
after its checkpoint."""

import glob
import json
import os
import struct

from mmada_jax.train import metrics_io


def read_events(logdir):
  """(file, Event) pairs of every TFRecord in the event files, in the order they were written (no TensorFlow needed)."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.*")), key=lambda p: int(p.rsplit(".", 1)[1])):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      out.append((path, event))
      i += 12 + n + 4
  return out


def test_resume_marks_a_session_restart_after_the_checkpoint(tmp_path):
  w = metrics_io.MetricsWriter(str(tmp_path))
  for step in range(1, 6):
    w.write(step, {"loss": float(step)})
  w.close()
  assert not any(e.HasField("session_log") for _, e in read_events(str(tmp_path / "tensorboard")))
  w = metrics_io.MetricsWriter(str(tmp_path), resumed_from=3)  # checkpoint at 3; steps 4 and 5 are logged again
  for step in (4, 5):
    w.write(step, {"loss": 10.0 * step})
  w.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
  events = [e for _, e in read_events(str(tmp_path / "tensorboard"))]
  restart = [i for i, e in enumerate(events) if e.HasField("session_log")]
  assert len(restart) == 1 and events[restart[0]].step == 4  # TensorBoard drops the older events from step 4 on
  scalars = lambda es: [(e.step, e.summary.value[0].simple_value) for e in es if e.HasField("summary")]
  assert scalars(events[:restart[0]]) == [(s, float(s)) for s in range(1, 6)]
  assert scalars(events[restart[0]:]) == [(4, 40.0), (5, 50.0)]

  fresh = tmp_path / "fresh"  # a first run (nothing to hide) writes no marker
  metrics_io.MetricsWriter(str(fresh), resumed_from=-1).close()
  assert not any(e.HasField("session_log") for _, e in read_events(str(fresh / "tensorboard")))
