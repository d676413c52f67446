"""Metrics output: WORKDIR/metrics.jsonl, TensorBoard event files, and a terminal progress bar with ETA and loss."""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from mmada_jax.train import faults


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


class _Bar:
  def __init__(self, total: int, start: int, enabled: bool):
    self.bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
    self.done = start

  def update(self, step: int, values: dict) -> None:
    if self.bar is None:
      return
    self.bar.update(step - self.done)
    self.done = step
    shown = {k: f"{values[k]:.4g}" for k in ("loss", "grad_norm", "tokens_per_s") if k in values}
    self.bar.set_postfix(shown, refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def progress(total: int, start: int, enabled: bool = True) -> _Bar:
  return _Bar(total, start, enabled)
