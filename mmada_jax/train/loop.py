"""One training loop for every stage (Decision 7): `mmada-jax train --config experiments/... --workdir DIR`.

Rerunning the same workdir resumes from its latest valid checkpoint (state, data iterator, step, numerics counters);
otherwise the run starts from `train.init_from` (a converted official checkpoint or another run's parameters) or from
random weights. Metrics are fetched one step late, so the host never waits for the device between steps, except at
checkpoint steps: their metric row is written before the checkpoint, and on resume rows after the restored step are
dropped, so a run killed at any point and restarted writes the same metrics.jsonl as an uninterrupted one.

Faults (train/faults.py): SIGTERM → checkpoint at the next step boundary, then exit 143; non-finite steps are skipped on
device and counted, `train.max_nonfinite_steps` consecutive ones stop the run; loss spikes are logged; a corrupt latest
checkpoint falls back to the newest valid one; a checkpoint of another model is refused (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from mmada_jax import checkpoint as ckpt, config as config_lib
from mmada_jax.eval import periodic
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.train import faults, flops as flops_lib, metrics_io, optim, state as state_lib, step as step_lib

LOOP_STATE_KEY = "_loop"  # the loop's own counters inside the checkpoint's `data` item, next to the iterator state
TIMING_METRICS = ("time", "step_time_s", "tokens_per_s", "mfu")  # the only metrics that differ between identical runs


@dataclasses.dataclass
class Run:
  """Everything a run holds between steps."""
  config: Any
  workdir: str
  mesh: Any
  rules: dict
  model: Any
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  step_fn: Callable
  data: Any
  checkpointer: ckpt.TrainCheckpointer
  eval_fn: Callable
  eval_data_factory: Callable[[], Any]
  guard: faults.NumericsGuard | None = None


def config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def place_batch(local: dict, mesh, rules) -> dict:
  """Per-host numpy rows -> global jax arrays sharded over the batch axes (multi-host safe)."""
  out = {}
  for task, arrays in local.items():
    out[task] = {k: jax.make_array_from_process_local_data(partitioning.batch_sharding(mesh, rules, np.ndim(v)),
                                                           np.asarray(v)) for k, v in arrays.items()}
  return out


def initial_state(config, model, tx, mesh, rules, abstract, shardings, log: Callable[[str], None]):
  """Random init, or `train.init_from` parameters (checked against the model shape).

  `train.init_from` is a parameter checkpoint (converted official weights, `mmada-jax convert`) or another run's
  workdir, whose latest checkpoint provides the parameters (the optimizer state starts afresh).
  """
  if not config.train.init_from:
    return state_lib.create_state(model, tx, jax.random.key(config.seed), mesh, rules, shardings)
  path = config.train.init_from
  if os.path.isdir(os.path.join(path, "checkpoints")):
    previous = ckpt.TrainCheckpointer(os.path.join(path, "checkpoints"), config.checkpoint)
    model_keys = tuple(k for k in ckpt.COMPATIBILITY_KEYS if k.startswith("model."))
    found = previous.restore_latest(abstract, config_json(config), keys=model_keys, move_aside=False, log=log)
    previous.close()
    if found is None:
      raise ckpt.CheckpointError(f"train.init_from={path}: the run has no (valid) checkpoint yet")
    step, state, _, _ = found
    log(f"initialised parameters from {path} (step {step})")
    return state_lib.state_from_params(state.params, tx, shardings)
  meta = ckpt.read_metadata(path)
  layout = "stacked" if config.model.scan_layers else "unstacked"
  expected = {"layer_layout": layout, "model.num_layers": config.model.num_layers,
              "model.d_model": config.model.d_model, "model.vocab_size": config.model.vocab_size,
              "model.num_heads": config.model.num_heads}
  ckpt.check_metadata(meta, expected, path)
  params, _ = ckpt.load_params(path, shardings=shardings.params)
  params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract.params)
  log(f"initialised parameters from {path}")
  return state_lib.state_from_params(params, tx, shardings)


def check_batch_shards(config, mesh, rules) -> None:
  """Raises ConfigError (before anything is compiled) when a task's global batch does not split over the batch shards
  (the `activation_batch` mesh axes)."""
  axes = [a for a in rules.get("activation_batch", ()) if mesh.shape[a] > 1]
  shards = math.prod(mesh.shape[a] for a in axes)
  errors = []
  for task in ("t2i", "lm", "mmu"):
    rows = int(config.data.get(f"batch_size_{task}", 0))
    if rows and rows % shards:
      errors.append(f"data.batch_size_{task}: {rows} rows cannot be split over the {shards} batch shards of mesh axes "
                    f"{axes} (sharding.preset={config.sharding.preset!r}, mesh {dict(mesh.shape)}); use a multiple of "
                    f"{shards} or change sharding.ici / sharding.rule_overrides.activation_batch")
  if errors:
    raise config_lib.ConfigError("invalid config for this mesh:\n  " + "\n  ".join(errors))


def setup(config, workdir: str, hooks_factory: Callable, data_factory: Callable,
          log: Callable[[str], None] = print) -> Run:
  """Mesh, model, sharded state (resumed when the workdir has a checkpoint), data iterator and jitted step.

  Everything that can be checked without compiling (mesh vs devices, batch vs batch shards, a checkpoint's config vs
  this one) is checked before the first compilation.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  check_batch_shards(config, mesh, rules)
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  checkpointer = ckpt.TrainCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  data = data_factory(config)
  guard = faults.NumericsGuard.from_config(config.train)
  found = checkpointer.restore_latest(abstract, config_json(config), log=log)
  if found is not None:
    latest, state, data_state, _ = found
    data_state = dict(data_state or {})
    guard.set_state(data_state.pop(LOOP_STATE_KEY, None))
    if data_state and hasattr(data, "set_state"):
      data.set_state(data_state)
    log(f"resumed from {checkpointer.directory} at step {latest}")
  else:
    state = initial_state(config, model, tx, mesh, rules, abstract, shardings, log)
  hooks = hooks_factory(config, model)
  step_fn = step_lib.make_train_step(hooks, tx, hooks.coefficients, int(config.train.micro_batches), int(config.seed),
                                     optim.learning_rate_schedule(config.optimizer), param_shardings=shardings.params)
  with partitioning.axis_rules(mesh, rules):
    jitted = jax.jit(step_fn, out_shardings=(shardings, None), donate_argnums=0)
  eval_fn = jax.jit(make_eval_fn(hooks))
  return Run(config, workdir, mesh, rules, model, state, shardings, jitted, data, checkpointer, eval_fn,
             lambda: data_factory(config, split="validation"), guard)


def make_eval_fn(hooks) -> Callable:
  """(params, batch, key) -> per-task (numerator, denominator) of the held-out masked-token loss (no gradients)."""

  def evaluate(params, batch, key):
    corrupted = hooks.corrupt(step_lib.add_example_ids(batch), key)
    nums, _ = hooks.numerators(params, corrupted)
    dens = hooks.denominators(corrupted)
    return {t: (nums[t], dens[t]) for t in nums}

  return evaluate


def evaluate(run: Run) -> dict:
  """Held-out loss per task over `train.eval_batches` validation batches, with fixed masks (same every time)."""
  data = run.eval_data_factory()
  sums: dict[str, list[float]] = {}
  for i in range(int(run.config.train.eval_batches)):
    batch = place_batch(next(data), run.mesh, run.rules)
    key = jax.random.fold_in(jax.random.key(int(run.config.seed) + 1), i)
    with partitioning.axis_rules(run.mesh, run.rules):
      terms = jax.device_get(run.eval_fn(run.state.params, batch, key))
    for t, (num, den) in terms.items():
      acc = sums.setdefault(t, [0.0, 0.0])
      acc[0], acc[1] = acc[0] + float(num), acc[1] + float(den)
  return {f"eval_loss_{t}": num / den for t, (num, den) in sums.items() if den > 0}


def _tokens(batch: dict) -> int:
  return int(sum(np.prod(a["input_ids"].shape) for a in batch.values()))


def train(run: Run, log: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Runs until `train.steps`; returns the last logged metrics.

  Raises `faults.Preempted` after SIGTERM (once the checkpoint of the current step is written) and
  `faults.NonFiniteError` after `train.max_nonfinite_steps` consecutive non-finite steps.
  """
  config = run.config
  total, start = int(config.train.steps), int(jax.device_get(run.state.step))
  run.guard = run.guard or faults.NumericsGuard.from_config(config.train)
  writer = _start_writer(run, start)
  peak = flops_lib.peak_flops_per_device(float(config.train.peak_tflops))
  bar = metrics_io.progress(total, start, enabled=progress)
  pending, last = None, {}
  t_prev = time.perf_counter()
  finish = lambda p: _finish(p, run, peak, writer, bar, log)
  sampler = periodic.PeriodicSampler(config, run.model, run.workdir, log=log) if int(config.train.sample_every) \
      else None
  try:
    with faults.StopRequest(log) as stop:
      for step in range(start, total):
        local = next(run.data)
        batch = place_batch(local, run.mesh, run.rules)
        with partitioning.axis_rules(run.mesh, run.rules):
          run.state, metrics = run.step_fn(run.state, batch)
        if pending is not None:  # fetch the previous step's metrics now: the device is already busy with this one
          last = finish(pending)
        now = time.perf_counter()
        pending = (step + 1, metrics, now - t_prev, _tokens(local) * jax.process_count(), local)
        t_prev = now
        faults.inject("sigterm", step + 1)
        due = _due(config, step + 1, sampler, stop.requested)
        if any(due.values()):  # this step's rows precede its evaluation and checkpoint
          last, pending = finish(pending), None
          last.update(_after_step(run, step + 1, due, sampler, writer, log))
      if pending is not None:
        last = finish(pending)
  finally:
    run.checkpointer.wait()
    bar.close()
    writer.close()
  return last


def _start_writer(run: Run, start: int) -> metrics_io.MetricsWriter:
  """The metrics writer of a run starting (or resuming) at `start`; a new run also gets WORKDIR/config.json and the
  held-out evaluation at initialisation (the start of the held-out curve)."""
  config = run.config
  writer = metrics_io.MetricsWriter(run.workdir, tensorboard=bool(config.train.tensorboard),
                                    resumed_from=start if start > 0 else -1)
  if start == 0:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump(config_json(config), f, indent=2)
    if config.train.eval_batches > 0:
      writer.write(0, evaluate(run))
  return writer


def _due(config, done: int, sampler, stop: bool) -> dict[str, bool]:
  """What runs after step `done`: held-out evaluation, periodic samples, a checkpoint, a stop (SIGTERM)."""
  total, every = int(config.train.steps), int(config.train.eval_every)
  return {"evaluate": config.train.eval_batches > 0 and ((every and done % every == 0) or done == total),
          "sample": sampler is not None and sampler.due(done, total),
          "save": done % int(config.checkpoint.save_every_steps) == 0 or done == total,
          "stop": stop}


def _after_step(run: Run, done: int, due: dict[str, bool], sampler, writer, log) -> dict:
  """Runs what `due` asks after step `done`; returns the scores written. Raises `faults.Preempted` on a stop before
  the last step, once the checkpoint is written."""
  config, scores = run.config, {}
  total = int(config.train.steps)
  if due["evaluate"]:
    scores.update(evaluate(run))
    writer.write(done, scores)
  if due["sample"]:
    with partitioning.axis_rules(run.mesh, run.rules):
      samples = sampler(done, run.state.params)
    writer.write(done, samples)
    scores.update(samples)
  if due["save"] or due["stop"]:
    run.checkpointer.save(done, run.state, _data_state(run), config_json(config),
                          force=done == total or due["stop"])
    faults.inject("kill_after_save", done)
  if due["stop"] and done < total:
    run.checkpointer.wait()
    message = (f"stopped by SIGTERM after step {done}: checkpoint written to {run.checkpointer.step_dir(done)}; "
               "rerun the same command to resume")
    log(message)
    raise faults.Preempted(message)
  return scores


def _data_state(run: Run) -> dict:
  """The checkpoint's `data` item: the iterator position plus the loop's numerics counters."""
  state = dict(run.data.get_state()) if hasattr(run.data, "get_state") else {}
  state[LOOP_STATE_KEY] = run.guard.get_state()
  return state


def _finish(pending, run: Run, peak, writer, bar, log) -> dict:
  step, metrics, seconds, tokens, local = pending
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  values["step_time_s"] = seconds
  values["tokens_per_s"] = tokens / max(seconds, 1e-9)
  c = run.config
  step_flops = sum(flops_lib.train_step_flops(c.model, a["input_ids"].shape[0] * jax.process_count(),
                                              a["input_ids"].shape[1], a["input_ids"].shape[1])
                   for a in local.values())
  if peak:
    values["mfu"] = step_flops / max(seconds, 1e-9) / (peak * jax.device_count())
  values.update(run.guard.update(step, values["loss"], values.get("finite", 1.0) > 0, log))
  bar.update(step, values)
  if step % int(c.train.log_every) == 0 or step == int(c.train.steps):
    writer.write(step, values)
  return values
