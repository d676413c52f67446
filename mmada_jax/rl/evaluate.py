"""Held-out evaluation of an RL policy: rewards and accuracy on the first `rl.eval_prompts` test prompts, greedy and
(with `rl.eval_samples` > 0) sampled like the rollouts, with the standard error of the accuracy over the prompts."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from mmada_jax.rl.prompts import PromptRecord, held_out_prompts
from mmada_jax.rl.rollout import EVAL_TAG, SAMPLED_EVAL_TAG, rollout
from mmada_jax.rl.setup import RLRun


def evaluate(run: RLRun, count: int) -> dict[str, float]:
  """Held-out rewards and accuracy on the first `count` test prompts (batches of the rollout size): greedy text
  answers; t2i images drawn with a fixed key. With `rl.eval_samples` = k > 0 each prompt is also answered k more times
  with other fixed keys, as `eval_sampled_*`: text sampled like the rollouts (temperature `rl.temperature`), the
  policy that RL optimises, whose accuracy a greedy evaluation of an already-confident model hides; t2i k more images
  per prompt, which shrinks the sampling noise of one image each. `eval_accuracy_se` / `eval_sampled_accuracy_se`:
  the standard error of the accuracy over the prompts (per-prompt means of the k answers for the sampled one)."""
  records = held_out_prompts(run.config, run.tokenizer, count)
  out = summary(scores(run, records, greedy=True, tag=EVAL_TAG), "eval", 1)
  k = int(run.config.rl.eval_samples)
  if k:
    repeated = [r for r in records for _ in range(k)]
    out.update(summary(scores(run, repeated, greedy=False, tag=SAMPLED_EVAL_TAG), "eval_sampled", k))
  return out


def summary(per_record: dict[str, list[float]], prefix: str, k: int) -> dict[str, float]:
  """Means of per-record scores (k consecutive records per prompt) and the standard error of the accuracy over the
  prompts."""
  out = {f"{prefix}_{name}": float(np.mean(v)) for name, v in per_record.items()}
  per_prompt = np.asarray(per_record["accuracy"], np.float64).reshape(-1, k).mean(axis=1)
  out[f"{prefix}_accuracy_se"] = float(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt))) if len(
      per_prompt) > 1 else 0.0
  return out


def scores(run: RLRun, records: list[PromptRecord], greedy: bool, tag: int) -> dict[str, list[float]]:
  """Each reward component (and accuracy) per record of `records`, rolled out in batches of the rollout size."""
  b = int(run.config.rl.prompts_per_step) * int(run.config.rl.group_size)
  out: dict[str, list] = {}
  for start in range(0, len(records), b):
    chunk = records[start:start + b]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (b - n)  # static batch shape: pad with repeats, dropped below
    key = jax.random.fold_in(jax.random.key(tag), start)  # greedy text: unused
    rewards = run.rewards(rollout(run, chunk, key, greedy=greedy)["samples"])
    for name, v in rewards.items():
      out.setdefault(name, []).extend(v[:n].tolist())
  return out


def evaluate_and_log(run: RLRun, step: int, log: Callable[[str], None]) -> dict[str, float]:
  """`evaluate` on `rl.eval_prompts` prompts, with one log line (accuracies ± their standard errors, seconds)."""
  t0 = time.perf_counter()
  result = evaluate(run, int(run.config.rl.eval_prompts))
  parts = [f"{name} {result[f'{prefix}_accuracy']:.4f} ± {result[f'{prefix}_accuracy_se']:.4f}"
           for prefix, name in (("eval", "accuracy"), ("eval_sampled", "sampled")) if f"{prefix}_accuracy" in result]
  seconds = time.perf_counter() - t0
  log(f"held-out evaluation at RL step {step} ({run.config.rl.eval_prompts} prompts, {seconds:.0f} s): "
      + ", ".join(parts))
  return result
