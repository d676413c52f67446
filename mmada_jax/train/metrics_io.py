"""Metrics output: WORKDIR/metrics.jsonl, TensorBoard event files, and progress with ETA and loss: a tqdm bar on a
terminal, plain lines (no carriage returns) when stderr is a log file, CI or a pod's log."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import TextIO

import jax
import tqdm

from mmada_jax.train import faults

SHOWN = ("loss", "grad_norm", "tokens_per_s")  # the values a progress display shows, when given


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl; mirrors scalars to TensorBoard when available.

  `resumed_from`: the step a run restarts after (-1: from scratch). What an interrupted run logged later is dropped:
  its metrics.jsonl rows are removed, and the event file written now starts with a session-restart marker at
  `resumed_from + 1`, which makes TensorBoard hide the older events from that step on."""

  def __init__(self, workdir: str, tensorboard: bool = True, resumed_from: int | None = None):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.primary and resumed_from is not None:
      faults.truncate_jsonl(self.path, resumed_from)
    if self.primary and tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        print("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)", file=sys.stderr)
      else:
        logdir = os.path.join(workdir, "tensorboard")
        earlier = os.path.isdir(logdir) and any(n.startswith("events.") for n in os.listdir(logdir))
        purge = resumed_from + 1 if earlier and resumed_from is not None else None
        # event files are named by the second they are opened: a unique suffix keeps a writer opened in the same second
        # as an earlier one from overwriting its file
        self.tb = SummaryWriter(logdir, purge_step=purge, filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, values: dict) -> None:
    if not self.primary:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
    return False


def _clock(seconds: float) -> str:
  """Seconds -> "M:SS" or "H:MM:SS"."""
  seconds = int(max(seconds, 0.0))
  h, rest = divmod(seconds, 3600)
  m, sec = divmod(rest, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _Bar:
  """Progress of a loop over steps `start` -> `total` (the loops' `update(step, values)` gives the step reached,
  `advance(n)` counts n more, as tqdm's update does). Shown on process 0 only, on `stream` (default sys.stderr):

  * a terminal (`stream.isatty()`): a tqdm bar with the latest loss / grad_norm / tokens_per_s;
  * anything else: one plain line each `every` steps, `every = ceil((total - start) / lines)` (so a run prints about
    `lines` lines), also when `heartbeat_s` passed since the last line and at the last step / on close, e.g.
    `step 120/1000 (12%), 3.21 step/s, elapsed 0:37, eta 4:34, loss=2.345, grad_norm=1.2`.
    The rate and ETA are those of the steps since the previous line."""

  def __init__(self, total: int, start: int, enabled: bool, unit: str = "step", stream: TextIO | None = None,
               lines: int = 40, heartbeat_s: float = 600.0, primary: bool | None = None):
    self.total, self.start, self.done, self.unit = int(total), int(start), int(start), unit
    self.stream = stream if stream is not None else sys.stderr
    self.bar = None
    self.plain = False
    self.values: dict = {}
    if not enabled:
      return
    if primary is None:
      primary = jax.process_index() == 0
    if not primary:
      return
    if _is_terminal(self.stream):
      self.bar = tqdm.tqdm(total=self.total, initial=self.start, unit=unit, dynamic_ncols=True, file=self.stream)
      return
    self.plain = True
    self.every = max(1, math.ceil((self.total - self.start) / max(1, lines)))
    self.heartbeat_s = heartbeat_s
    self.t0 = self.t_line = time.monotonic()
    self.step_line = self.start

  def update(self, step: int, values: dict | None = None) -> None:
    """The loop reached `step` (absolute); `values` (loss, ...) are the latest metrics."""
    if self.bar is not None:
      self.bar.update(step - self.done)
      self.done = step
      if values:
        self.bar.set_postfix({k: f"{values[k]:.4g}" for k in SHOWN if k in values}, refresh=False)
      return
    self.done = step
    if not self.plain:
      return
    if values:
      self.values = values
    now = time.monotonic()
    crossed = (step - self.start) // self.every > (self.step_line - self.start) // self.every
    if step > self.step_line and (crossed or step >= self.total or now - self.t_line >= self.heartbeat_s):
      self._line(now)

  def advance(self, n: int = 1, values: dict | None = None) -> None:
    """`n` more steps done (tqdm's update(n))."""
    self.update(self.done + n, values)

  def _line(self, now: float) -> None:
    steps, seconds = self.done - self.step_line, max(now - self.t_line, 1e-9)
    rate = steps / seconds
    speed = f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}"
    left = max(self.total - self.done, 0)
    eta = _clock(left / rate) if rate > 0 else "?"
    pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
    parts = [f"{self.unit} {self.done}/{self.total}{pct}", speed, f"elapsed {_clock(now - self.t0)}", f"eta {eta}"]
    parts += [f"{k}={self.values[k]:.4g}" for k in SHOWN if k in self.values]
    self.stream.write(", ".join(parts) + "\n")
    self.stream.flush()
    self.t_line, self.step_line = now, self.done

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    elif self.plain and self.done > self.step_line:
      self._line(time.monotonic())  # where the loop stopped (end, preemption, error)
    self.plain = False

  def __enter__(self) -> "_Bar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(total: int, start: int, enabled: bool = True, unit: str = "step", stream: TextIO | None = None,
             lines: int = 40, heartbeat_s: float = 600.0, primary: bool | None = None) -> _Bar:
  """Progress display for steps `start` -> `total`: tqdm on a terminal, ~`lines` plain lines otherwise (see _Bar).
  `primary`: whether this process shows it (default: JAX process 0). Also a context manager (closes on exit)."""
  return _Bar(total, start, enabled, unit=unit, stream=stream, lines=lines, heartbeat_s=heartbeat_s, primary=primary)
