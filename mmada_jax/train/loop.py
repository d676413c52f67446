"""One training loop for every stage (Decision 7): `mmada-jax train --config experiments/... --workdir DIR`.

Rerunning the same workdir resumes from its latest checkpoint (state, data iterator, step); otherwise the run starts
from `train.init_from` (a converted official checkpoint or another run's parameters) or from random weights.
Metrics are fetched one step late, so the host never waits for the device between steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from mmada_jax import checkpoint as ckpt
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.train import flops as flops_lib, metrics_io, optim, state as state_lib, step as step_lib


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
    step = previous.latest_step()
    if step is None:
      raise ckpt.CheckpointError(f"train.init_from={path}: the run has no checkpoint yet")
    state, _, _ = previous.restore(step, abstract)
    previous.close()
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


def setup(config, workdir: str, hooks_factory: Callable, data_factory: Callable,
          log: Callable[[str], None] = print) -> Run:
  """Mesh, model, sharded state (resumed when the workdir has a checkpoint), data iterator and jitted step."""
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  checkpointer = ckpt.TrainCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  data = data_factory(config)
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data_state, _ = checkpointer.restore(latest, abstract)
    if data_state and hasattr(data, "set_state"):
      data.set_state(data_state)
    log(f"resumed from {checkpointer.directory} at step {latest}")
  else:
    state = initial_state(config, model, tx, mesh, rules, abstract, shardings, log)
  hooks = hooks_factory(config, model)
  step_fn = step_lib.make_train_step(hooks, tx, hooks.coefficients, int(config.train.micro_batches), int(config.seed),
                                     optim.learning_rate_schedule(config.optimizer))
  with partitioning.axis_rules(mesh, rules):
    jitted = jax.jit(step_fn, out_shardings=(shardings, None), donate_argnums=0)
  eval_fn = jax.jit(make_eval_fn(hooks))
  return Run(config, workdir, mesh, rules, model, state, shardings, jitted, data, checkpointer, eval_fn,
             lambda: data_factory(config, split="validation"))


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
  """Runs until `train.steps`; returns the last logged metrics."""
  config = run.config
  total, start = int(config.train.steps), int(jax.device_get(run.state.step))
  writer = metrics_io.MetricsWriter(run.workdir, tensorboard=bool(config.train.tensorboard))
  if start == 0:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump(config_json(config), f, indent=2)
  peak = flops_lib.peak_flops_per_device(float(config.train.peak_tflops))
  if start == 0 and config.train.eval_batches > 0:
    writer.write(0, evaluate(run))  # the value at initialisation, the start of the held-out curve
  bar = metrics_io.progress(total, start, enabled=progress)
  pending, last = None, {}
  t_prev = time.perf_counter()
  try:
    for step in range(start, total):
      local = next(run.data)
      batch = place_batch(local, run.mesh, run.rules)
      with partitioning.axis_rules(run.mesh, run.rules):
        run.state, metrics = run.step_fn(run.state, batch)
      if pending is not None:  # fetch the previous step's metrics now: the device is already busy with this one
        last = _finish(pending, run, peak, writer, bar, log)
      now = time.perf_counter()
      pending = (step + 1, metrics, now - t_prev, _tokens(local) * jax.process_count(), local)
      t_prev = now
      every = int(config.train.eval_every)
      if config.train.eval_batches > 0 and ((every and (step + 1) % every == 0) or step + 1 == total):
        last = _finish(pending, run, peak, writer, bar, log)
        pending = None
        scores = evaluate(run)
        writer.write(step + 1, scores)
        last.update(scores)
      if (step + 1) % int(config.checkpoint.save_every_steps) == 0 or step + 1 == total:
        run.checkpointer.save(step + 1, run.state, _data_state(run.data), config_json(config), force=step + 1 == total)
    if pending is not None:
      last = _finish(pending, run, peak, writer, bar, log)
  finally:
    run.checkpointer.wait()
    bar.close()
    writer.close()
  return last


def _data_state(data) -> dict | None:
  return data.get_state() if hasattr(data, "get_state") else None


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
  bar.update(step, values)
  if step % int(c.train.log_every) == 0 or step == int(c.train.steps):
    writer.write(step, values)
  return values
