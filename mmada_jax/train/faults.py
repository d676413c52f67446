"""Failure handling shared by the training and UniGRPO loops: SIGTERM, non-finite steps, loss spikes, metric files.

- `StopRequest`: a SIGTERM handler (the way Cloud TPU announces maintenance) that only sets a flag; the loop writes a
  checkpoint at the next step boundary, waits for it and raises `Preempted` (exit status 143).
- `NumericsGuard`: host-side bookkeeping of steps the jitted step skipped because their loss or gradient norm was not
  finite (the step itself keeps the old parameters and optimiser state), and of loss spikes (loss > k × the running
  median). Its state travels in the checkpoint, so a resumed run counts exactly as an uninterrupted one.
- `truncate_jsonl`: on resume, drops the metric / sample rows written after the restored checkpoint, so that the files
  of a run killed and restarted equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from typing import Callable

import numpy as np

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INJECT_ENV = "MMADA_FAULT_INJECT"  # test hook, e.g. "kill_after_save:3" or "sigterm:5" (tests/test_faults_*.py)


class NonFiniteError(ValueError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class Preempted(SystemExit):
  """SIGTERM arrived; a final checkpoint was written. Exit status 143 (128 + SIGTERM), as a killed process."""

  def __init__(self, message: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = message

  def __str__(self) -> str:
    return self.message


class StopRequest:
  """Context manager: while active, SIGTERM sets `requested` instead of killing the process.

  Installed only in the main thread (signal handlers cannot be set elsewhere); the previous handler is restored on exit.
  A second SIGTERM while the final checkpoint is being written is ignored (the loop is already stopping).
  """

  def __init__(self, log: Callable[[str], None] = print):
    self.requested = False
    self.log = log
    self._previous = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if not self.requested:
      self.log("SIGTERM received: writing a checkpoint at the next step boundary, then exiting")
    self.requested = True

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class NumericsGuard:
  """Counts skipped (non-finite) steps and loss spikes from each step's fetched metrics.

  Args:
    max_consecutive: raise `NonFiniteError` when this many consecutive steps were non-finite (0 = never).
    spike_factor: a finite loss above `spike_factor` × the median of the last `window` finite losses is a spike
      (logged, counted; the step is applied). 0 = off.
    window: losses kept for the running median; spikes are judged once `min(window, 10)` losses are known.
    what: "train" or "rl", for messages.
  """

  def __init__(self, max_consecutive: int, spike_factor: float, window: int, what: str = "train"):
    self.max_consecutive, self.spike_factor, self.window, self.what = max_consecutive, spike_factor, window, what
    self.consecutive, self.total, self.spikes = 0, 0, 0
    self.history: list[float] = []

  def update(self, step: int, loss: float, finite: bool, log: Callable[[str], None]) -> dict:
    """Books one step; returns metrics to add to its row (`nonfinite_steps`, `loss_spikes`, `loss_spike`)."""
    spike = 0.0
    if not finite or not math.isfinite(loss):
      self.consecutive += 1
      self.total += 1
      log(f"{self.what} step {step}: non-finite loss or gradient (loss={loss}); update skipped, parameters and "
          f"optimiser state unchanged ({self.consecutive} in a row, {self.total} in all)")
      if self.max_consecutive and self.consecutive >= self.max_consecutive:
        first = step - self.consecutive + 1
        raise NonFiniteError(
            f"{self.what}: {self.consecutive} consecutive steps ({first}..{step}) had a non-finite loss or gradient "
            f"(limit train.max_nonfinite_steps={self.max_consecutive}); the parameters are those before step {first}. "
            f"Lower the learning rate, check the data of those steps, or resume from an earlier checkpoint")
    else:
      self.consecutive = 0
      need = min(self.window, 10)
      if self.spike_factor > 0 and len(self.history) >= need:
        median = float(np.median(self.history))
        if median > 0 and loss > self.spike_factor * median:  # (an RL surrogate loss may be <= 0: no spikes then)
          spike = 1.0
          self.spikes += 1
          log(f"{self.what} step {step}: loss spike {loss:.6g} > {self.spike_factor:g} x running median "
              f"{median:.6g} (last {len(self.history)} steps)")
      self.history = (self.history + [float(loss)])[-self.window:]
    return {"nonfinite_steps": float(self.total), "loss_spikes": float(self.spikes), "loss_spike": spike}

  def get_state(self) -> dict:
    return {"consecutive": self.consecutive, "total": self.total, "spikes": self.spikes, "history": self.history}

  def set_state(self, state: dict | None) -> None:
    state = state or {}
    self.consecutive, self.total = int(state.get("consecutive", 0)), int(state.get("total", 0))
    self.spikes, self.history = int(state.get("spikes", 0)), [float(x) for x in state.get("history", [])]

  @classmethod
  def from_config(cls, train_config, what: str = "train") -> "NumericsGuard":
    """The guard of `train.*` settings; for "rl" without spike detection: the clipped surrogate has no scale (about 0
    at θ = θ_old, of either sign), so a multiple of its running median flags noise."""
    spike = 0.0 if what == "rl" else float(train_config.loss_spike_factor)
    return cls(int(train_config.max_nonfinite_steps), spike, int(train_config.loss_spike_window), what)


def inject(point: str, step: int) -> None:
  """Fault-injection hook for the tests: when $MMADA_FAULT_INJECT lists `point:step`, the process signals itself —
  SIGKILL at "kill_after_save" (just after an asynchronous checkpoint write was started, so it is still in flight),
  SIGTERM at "sigterm" (as an external preemption notice would). Does nothing when the variable is unset."""
  spec = os.environ.get(INJECT_ENV)
  if not spec:
    return
  for item in spec.split(","):
    name, _, at = item.partition(":")
    if name == point and at.strip() == str(step):
      os.kill(os.getpid(), signal.SIGKILL if point == "kill_after_save" else signal.SIGTERM)


def truncate_jsonl(path: str, keep_through: int, step_key: str = "step") -> int:
  """Keeps the rows of `path` whose `step_key` is <= `keep_through` (none when it is < 0); drops unreadable lines
  (a write cut by a kill). Returns the number of rows removed. The file is replaced atomically."""
  if not os.path.exists(path):
    return 0
  kept, removed = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = isinstance(row, dict) and int(row[step_key]) <= keep_through
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        removed += 1
  if removed:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return removed
