"""The UniGRPO loop (`mmada-jax rl --config experiments/toyworld_rl.py:text --workdir DIR [--init_from CKPT]`).

One RL step (Algorithm 1, specs/unigrpo.md §2.1, §6.1):
  1. Q prompts from the prompt source (`rl/prompts.py`), each repeated G times (rows group-major); with
     `rl.oversample` = F, F·Q prompts, of which the Q groups with differing rewards are kept after step 3;
  2. rollouts with the semi-autoregressive text sampler (`sampling_text.generate`, `rl.temperature`), same padding mask
     as every later log-probability pass (spec §7.6) (`rl/rollout.py`);
  3. on the host: decode, rewards (`rewards.RewardModel`), group-normalised advantages, zero-std groups;
  4. the mask-ratio schedule `[μ, K, B]` and, on device, the old and reference log-probabilities of every mask;
  5. μ policy steps n = 0..μ−1 (one compiled program, n traced; `rl/programs.py`).
Keys: rollout key = fold_in(key(rl.seed), rl_step), so a resumed run repeats exactly what an uninterrupted run does.
(`rl.seed`, not `seed`, varies RL runs: `seed` also fixes the ToyWorld data, hence its tokenizer.)

Rerunning the same workdir resumes from its latest checkpoint (`rl/setup.py`): policy parameters and optimiser state
(Orbax, `checkpoints/<rl_step>/state`), and in its JSON item the prompt source state, the RL step, the seed and the
*reference handle* — the parameter checkpoint holding the frozen reference (`train.init_from`, or `WORKDIR/reference`
written at the start of a run from random weights). Metrics go to WORKDIR/metrics.jsonl (one line per RL step), sample
dumps to WORKDIR/samples.jsonl, held-out evaluations (`rl/evaluate.py`) to the metrics as `eval_*`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.models import image_io
from mmada_jax.parallel import partitioning
from mmada_jax.rl import objective as obj, rollout as rollout_lib
from mmada_jax.rl.evaluate import evaluate_and_log
from mmada_jax.rl.setup import RLRun, setup, stored_handle
from mmada_jax.train import faults, loop as train_loop, metrics_io

__all__ = ["RLRun", "rl_step", "setup", "train"]


# ----------------------------------------------------------------------------------------------------------------------
# One RL step


def rl_step(run: RLRun, log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
  """Rollout → rewards → precompute → μ policy steps. Returns (metrics, dumped samples with their rewards).

  With `rl.oversample` = F > 1 (dynamic sampling, as DAPO): F·Q prompts are rolled out (F batches of the usual shape)
  and the Q groups trained on are those whose rewards differ (`rollout.select_groups`), so fewer rows carry no signal;
  which rewards must differ is `rl.oversample_by` (the total, or the accuracy alone as DAPO, where a group whose images
  differ only in partial attribute scores is not enough). The reward / accuracy metrics cover every rollout (the
  policy on fresh prompts); `kept_zero_std_frac` is the share of trained groups whose total rewards carry none, and
  `kept_by_spread_frac` the share with a spread in `rl.oversample_by`.
  """
  r = run.config.rl
  q, g, f = int(r.prompts_per_step), int(r.group_size), int(r.oversample)
  key = jax.random.fold_in(jax.random.key(int(r.seed)), run.rl_step)
  drawn = run.prompts.next(q * f)
  t0 = time.perf_counter()
  roll_all, scores_all = rollout_lib.rollout_groups(run, drawn, key)
  t1 = time.perf_counter()
  adv_all = obj.group_advantages(scores_all["total"], g, std=bool(r.adv_std), eps=float(r.adv_eps),
                                 filter_zero_std=bool(r.filter_zero_std))
  roll, scores, adv, kept = rollout_lib.trained_rows(run.config, roll_all, scores_all, adv_all)
  per_iter = _policy_steps(run, rollout_lib.build_batch(run.config, roll, adv, run.rl_step, key))
  t2 = time.perf_counter()
  run.rl_step += 1
  booked = _book(run, per_iter, log)
  metrics = _step_metrics(per_iter, scores_all, adv_all, roll_all, run.rewards.names)
  metrics.update(booked, adv_abs=float(np.mean(np.abs(adv["adv"]))))
  metrics.update(kept)
  metrics.update(rollout_s=t1 - t0, update_s=t2 - t1, optimizer_step=float(jax.device_get(run.state.step)))
  dumps = [dict({k: v for k, v in s.items() if k != "record"}, **{k: float(v[i]) for k, v in scores.items()},
                advantage=float(adv["adv"][i]))
           for i, s in enumerate(roll["samples"][:int(r.dump_count)])]
  return metrics, dumps


def _policy_steps(run: RLRun, host_batch: dict) -> list[dict]:
  """Places the RLBatch, adds the old / reference log-probabilities and takes the μ policy steps → their metrics."""
  batch = rollout_lib.place(host_batch, run.programs.batch_shardings)
  with partitioning.axis_rules(run.mesh, run.rules):
    batch.update(run.programs.precompute(run.state.params, run.ref_params, batch))
    per_iter = []
    for n in range(int(run.config.rl.inner_steps)):
      run.state, m = run.programs.step(run.state, batch, jnp.int32(n))
      per_iter.append(m)
  return jax.device_get(per_iter)


def _book(run: RLRun, per_iter: list[dict], log: Callable[[str], None]) -> dict:
  """Counts skipped (non-finite) policy steps, per optimiser step, in the run's numerics guard; its last metrics."""
  mu = int(run.config.rl.inner_steps)
  guard = run.guard or faults.NumericsGuard.from_config(run.config.train, what="rl")
  run.guard = guard
  for n, m in enumerate(per_iter):
    booked = guard.update((run.rl_step - 1) * mu + n + 1, float(m["loss"]), float(m["finite"]) > 0, log)
  return booked


def _step_metrics(per_iter: list[dict], scores: dict, adv: dict, roll: dict, names) -> dict:
  out = {f"reward_{n}": float(np.mean(scores[n])) for n in names}
  out.update(reward_total=float(np.mean(scores["total"])), accuracy=float(np.mean(scores["accuracy"])),
             zero_std_frac=float(np.mean(adv["zero_std"])), adv_abs=float(np.mean(np.abs(adv["adv"]))),
             response_len=float(np.mean([s["length"] for s in roll["samples"]])),
             truncated_frac=float(np.mean([s["truncated"] for s in roll["samples"]])))
  for k in per_iter[0]:
    vals = [float(m[k]) for m in per_iter]
    out[k] = max(vals) if k == "ratio_max" else min(vals) if k == "ratio_min" else float(np.mean(vals))
  out["ratio_first_iter"] = float(per_iter[0]["ratio_mean"])  # exactly 1: θ = θ_old at n = 0 (spec §6.6)
  out["loss_last_iter"] = float(per_iter[-1]["loss"])
  return out


# ----------------------------------------------------------------------------------------------------------------------
# The driver


def _save(run: RLRun, force: bool) -> None:
  data = {"prompts": run.prompts.get_state(), "rl_step": run.rl_step,
          "reference": stored_handle(run.workdir, run.ref_handle),
          "rng": {"rl.seed": int(run.config.rl.seed), "rl_step": run.rl_step},
          "loop": run.guard.get_state() if run.guard else {}}
  run.checkpointer.save(run.rl_step, run.state, data, train_loop.config_json(run.config), force=force)


def _dump(workdir: str, rl_step: int, dumps: list[dict]) -> None:
  """Appends the dumped samples to WORKDIR/samples.jsonl; t2i images to WORKDIR/samples/rl_step_<n>.png (in the order
  of the JSON lines)."""
  images = [d.pop("image") for d in dumps if "image" in d]
  if jax.process_index() != 0:
    return
  if images:
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    image_io.save_grid(np.stack(images), os.path.join(workdir, "samples", f"rl_step_{rl_step}.png"))
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    for d in dumps:
      f.write(json.dumps({"rl_step": rl_step, **d}) + "\n")


def train(run: RLRun, log: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Runs RL steps until `rl.steps`; checkpoints every `checkpoint.save_every_steps` RL steps and at the end.

  Returns the last logged metrics (held-out `eval_*` included when `rl.eval_prompts` > 0). Raises `faults.Preempted`
  after SIGTERM, once the checkpoint of the current RL step is written.
  """
  config, r = run.config, run.config.rl
  total = int(r.steps)
  keep = run.rl_step if run.rl_step > 0 else -1  # rows after the restored RL step came from an interrupted run
  if jax.process_index() == 0:
    faults.truncate_jsonl(os.path.join(run.workdir, "samples.jsonl"), keep, step_key="rl_step")
  writer = metrics_io.MetricsWriter(run.workdir, tensorboard=bool(config.train.tensorboard), resumed_from=keep)
  if run.rl_step == 0:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump(train_loop.config_json(config), f, indent=2)
    if int(r.eval_prompts) > 0 and r.eval_at_start:
      writer.write(0, evaluate_and_log(run, 0, log))
  bar = metrics_io.progress(total, run.rl_step, enabled=progress)
  last: dict = {}
  try:
    with faults.StopRequest(log) as stop:
      while run.rl_step < total:
        last, saved = _one_step(run, writer, bar, log)
        if stop.requested and run.rl_step < total:
          if not saved:
            _save(run, force=True)
          run.checkpointer.wait()
          message = (f"stopped by SIGTERM after RL step {run.rl_step}: checkpoint written to "
                     f"{run.checkpointer.step_dir(run.rl_step)}; rerun the same command to resume")
          log(message)
          raise faults.Preempted(message)
  finally:
    run.checkpointer.wait()
    bar.close()
    writer.close()
  log(f"RL step {run.rl_step}: " + ", ".join(f"{k}={last[k]:.4g}" for k in sorted(last) if k.startswith(
      ("reward_total", "accuracy", "kl", "eval_accuracy"))))
  return last


def _one_step(run: RLRun, writer: metrics_io.MetricsWriter, bar, log: Callable[[str], None]) -> tuple[dict, bool]:
  """One RL step with its metric row, sample dump, evaluation and checkpoint (all written before the next step).
  Returns (metrics, whether a checkpoint was saved)."""
  config, r = run.config, run.config.rl
  total = int(r.steps)
  metrics, dumps = rl_step(run, log)
  step = run.rl_step
  faults.inject("sigterm", step)
  bar.update(step, {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})
  if step % int(r.log_every) == 0 or step == total:
    writer.write(step, metrics)
  if int(r.dump_every) and (step % int(r.dump_every) == 0 or step == total):
    _dump(run.workdir, step, dumps)
  every = int(r.eval_every)
  if int(r.eval_prompts) > 0 and ((every and step % every == 0) or step == total):
    scores = evaluate_and_log(run, step, log)
    writer.write(step, scores)
    metrics = dict(metrics, **scores)
  saved = step % int(config.checkpoint.save_every_steps) == 0 or step == total
  if saved:
    _save(run, force=step == total)
    faults.inject("kill_after_save", step)
  return metrics, saved
