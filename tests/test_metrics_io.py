"""metrics.jsonl / TensorBoard writer: a resumed run drops the rows and hides the events an interrupted run logged
after its checkpoint. Progress: plain lines when stderr is not a terminal, tqdm when it is."""

import glob
import io
import json
import os
import re
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


class _Stream(io.StringIO):
  """A text stream that says whether it is a terminal."""

  def __init__(self, tty: bool):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def test_progress_writes_plain_lines_when_not_a_terminal():
  out = _Stream(tty=False)
  with metrics_io.progress(1000, 0, stream=out, primary=True) as bar:
    for step in range(1, 1001):
      bar.update(step, {"loss": 10.0 / step, "grad_norm": 0.5, "step_time_s": 0.1})
  text = out.getvalue()
  assert "\r" not in text and "\x1b" not in text
  lines = text.splitlines()
  assert len(lines) == 40  # one each 25 steps, the last at 1000; close adds nothing
  assert lines[0].startswith("step 25/1000 (2%), ") and lines[-1].startswith("step 1000/1000 (100%), ")
  shape = re.compile(r", [\d.e+]+ (step/s|s/step), elapsed \d+:\d\d, eta \d+:\d\d, loss=[\d.e-]+, grad_norm=0.5$")
  assert all(shape.search(line) for line in lines), lines[:3]
  assert lines[-1].endswith("eta 0:00, loss=0.01, grad_norm=0.5") and "step_time_s" not in text


def test_progress_plain_lines_resume_advance_and_close():
  out = _Stream(tty=False)
  bar = metrics_io.progress(100, 60, stream=out, unit="rec", lines=4, primary=True)  # resumed at 60: every 10
  for _ in range(7):
    bar.advance(5)  # tqdm-style counting: 65, 70, ..., 95
  bar.close()  # stopped at 95: the last line says where
  bar.close()
  steps = [int(re.match(r"rec (\d+)/100", line).group(1)) for line in out.getvalue().splitlines()]
  assert steps == [70, 80, 90, 95]
  assert "loss" not in out.getvalue()


def test_progress_plain_heartbeat_and_quiet_cases(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(metrics_io.time, "monotonic", lambda: clock[0])
  out = _Stream(tty=False)
  bar = metrics_io.progress(1000, 0, stream=out, heartbeat_s=60.0, primary=True)
  bar.update(1, {"loss": 2.0})
  assert out.getvalue() == ""
  clock[0] = 130.0  # a slow step: a line although no 25-step mark was crossed
  bar.update(2, {"loss": 1.5})
  assert out.getvalue() == "step 2/1000 (0%), 65 s/step, elapsed 2:10, eta 18:01:10, loss=1.5\n"
  bar.close()
  out = _Stream(tty=False)
  for bar in (metrics_io.progress(10, 0, enabled=False, stream=out), metrics_io.progress(10, 0, stream=out,
                                                                                          primary=False)):
    with bar:
      bar.update(10, {"loss": 1.0})
  assert out.getvalue() == ""


def test_progress_keeps_tqdm_on_a_terminal(monkeypatch):
  import tqdm

  made = []

  class FakeTqdm:
    def __init__(self, **kw):
      made.append(self)
      self.kw, self.n, self.postfix, self.closed = kw, kw["initial"], None, False

    def update(self, n):
      self.n += n

    def set_postfix(self, shown, refresh):
      self.postfix = shown

    def close(self):
      self.closed = True

  monkeypatch.setattr(tqdm, "tqdm", FakeTqdm)
  out = _Stream(tty=True)
  with metrics_io.progress(50, 10, stream=out, primary=True) as bar:
    bar.update(12, {"loss": 1.23456, "grad_norm": 2.0, "mfu": 0.4})
    bar.advance(3)
  (t,) = made
  assert t.kw["file"] is out and t.kw["total"] == 50 and t.kw["unit"] == "step"
  assert t.n == 15 and t.postfix == {"loss": "1.235", "grad_norm": "2"} and t.closed
  assert out.getvalue() == ""  # the fake wrote nothing: no plain lines on a terminal
