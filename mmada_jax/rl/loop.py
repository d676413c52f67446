"""The UniGRPO loop: `mmada-jax rl --config experiments/toyworld_rl.py:text --workdir DIR [--init_from CKPT]`.

One RL step (Algorithm 1, specs/unigrpo.md §2.1, §6.1):
  1. Q prompts from the prompt iterator, each repeated G times (rows group-major); with `rl.oversample` = F, F·Q
     prompts, of which the Q groups with differing rewards are kept after step 3 (`rl_step`);
  2. rollouts with the semi-autoregressive text sampler (`sampling_text.generate`, `rl.temperature`), same padding mask
     as every later log-probability pass (spec §7.6);
  3. on the host: decode, rewards (`rewards.RewardModel`), group-normalised advantages, zero-std groups;
  4. the mask-ratio schedule `[μ, K, B]` and, on device, the old and reference log-probabilities of every mask;
  5. μ policy steps n = 0..μ−1 (one compiled program, n traced).
Keys: rollout key = fold_in(key(rl.seed), rl_step), so a resumed run repeats exactly what an uninterrupted run does.
(`rl.seed`, not `seed`, varies RL runs: `seed` also fixes the ToyWorld data, hence its tokenizer.)

Rerunning the same workdir resumes from its latest checkpoint: policy parameters and optimiser state (Orbax,
`checkpoints/<rl_step>/state`), and in its JSON item the prompt iterator state, the RL step, the seed and the
*reference handle* — the parameter checkpoint holding the frozen reference (`train.init_from`, or `WORKDIR/reference`
written at the start of a run from random weights). Metrics go to WORKDIR/metrics.jsonl (one line per RL step), sample
dumps to WORKDIR/samples.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax import checkpoint as ckpt, config as config_lib
from mmada_jax.data import toyworld as tw
from mmada_jax.diffusion import sampling_text
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.rl import masks as masks_lib, objective as obj, rewards as rewards_lib, schedule, step as step_lib
from mmada_jax.rl import t2i as t2i_lib
from mmada_jax.tokens import text_tokenizer as tt, vocab as vocab_lib
from mmada_jax.train import data_setup, faults, loop as train_loop, metrics_io, optim, state as state_lib

SCHEDULE_TAG, MASK_TAG, ROLLOUT_TAG, EVAL_TAG, SAMPLED_EVAL_TAG = 0, 1, 2, 3, 4
REFERENCE_DIR = "reference"  # WORKDIR/reference: the frozen reference of runs started from random weights


# ----------------------------------------------------------------------------------------------------------------------
# Prompts


class ToyWorldPrompts:
  """ToyWorld prompts in a deterministic order (a seeded permutation per epoch): the arithmetic word problems as CoT
  chat prompts (`rl.task="text"`), or the drawing prompts (`"t2i"`, `rl/t2i.py`).

  `next(q)` returns q records `{"id", "prompt_ids", "prompt", "answer"}` (t2i: `"record"` instead of `"answer"`);
  `get_state` / `set_state` checkpoint the position. `split="test"` walks the held-out split in order.
  """

  def __init__(self, config, tokenizer, split: str = "train"):
    self.task = str(config.rl.task)
    self.world = tw.ToyWorld.from_config(config)
    self.vocab = vocab_lib.Vocab.from_config(config.vocab)
    self.tokenizer, self.split, self.seed = tokenizer, split, int(config.rl.seed)
    self.count = int(config.data.toyworld[f"num_{split}"])
    if self.count < 1:
      raise ValueError(f"data.toyworld.num_{split} must be >= 1 for RL prompts")
    self.position = 0
    self._order: tuple[int, np.ndarray] | None = None

  def _index(self, i: int) -> int:
    epoch, offset = divmod(i, self.count)
    if self.split != "train":
      return offset
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self.seed, 7, epoch]).permutation(self.count))
    return int(self._order[1][offset])

  def record(self, index: int) -> dict:
    if self.task == "t2i":
      return t2i_lib.draw_record(self.world, self.split, index, self.tokenizer)
    r = self.world.example(self.split, index, render_image=False)
    text = tt.chat_text([{"role": "user", "content": tt.COT_SYSTEM_PROMPT + r["problem"]}], self.vocab,
                        add_generation_prompt=True)
    ids = [self.vocab.bos_id] + self.tokenizer.encode(text)
    return {"id": r["id"], "prompt_ids": ids, "prompt": r["problem"], "answer": r["problem_answer"]}

  def next(self, q: int) -> list[dict]:
    out = [self.record(self._index(self.position + j)) for j in range(q)]
    self.position += q
    return out

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state.get("position", 0))


def pad_prompts(prompts: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to the static `rl.prompt_len` → (ids [B, length], mask [B, length])."""
  longest = max(len(p) for p in prompts)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than rl.prompt_len={length}; raise rl.prompt_len")
  ids, mask = sampling_text.left_pad(prompts, pad_id)
  pad = length - ids.shape[1]
  return np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (pad, 0)))


# ----------------------------------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class RLRun:
  config: Any
  workdir: str
  mesh: Any
  rules: dict
  model: Any
  tokenizer: Any
  vocab: vocab_lib.Vocab
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  ref_params: Any
  ref_handle: str
  prompts: ToyWorldPrompts
  checkpointer: ckpt.TrainCheckpointer
  rewards: rewards_lib.RewardModel
  settings: step_lib.StepSettings
  fns: dict
  rl_step: int = 0
  guard: faults.NumericsGuard | None = None
  images: Any = None  # the MAGVIT decoder of t2i rollouts (`sample_cli.ImageTokenizer`)


_JIT_CACHE: dict = {}


def _functions(config, model, tx, mesh, rules, shardings, settings: step_lib.StepSettings, batch_sh) -> dict:
  """Jitted precompute and policy step, cached per (model, settings, optimiser, mesh, rules, batch layout), so that
  several runs in one process (tests, resumption) compile once."""
  key = (model, settings, config.optimizer.to_json(), mesh, tuple(sorted(rules.items())),
         tuple(sorted((k, str(v)) for k, v in batch_sh.items())))
  if key not in _JIT_CACHE:
    with_ref = settings.loss.beta > 0
    pre = step_lib.jit_precompute(step_lib.make_precompute(model, settings), shardings.params, batch_sh, mesh, rules,
                                  with_ref)
    full_sh = dict(batch_sh, **step_lib.logp_shardings(mesh, rules, with_ref))
    pol = step_lib.make_policy_step(model, tx, settings, optim.learning_rate_schedule(config.optimizer),
                                    param_shardings=shardings.params)
    _JIT_CACHE[key] = {"precompute": pre, "step": step_lib.jit_policy_step(pol, shardings, full_sh, mesh),
                       "batch_shardings": batch_sh, "full_shardings": full_sh}
  return _JIT_CACHE[key]


_TOKENIZERS: dict = {}


def _tokenizer(config):
  """`data_setup.make_tokenizer`, once per vocabulary / tokenizer source in a process (the ToyWorld one is trained)."""
  key = (config.vocab.to_json(), str(config.data.tokenizer_dir), config.data.toyworld.to_json(), int(config.seed))
  if key not in _TOKENIZERS:
    _TOKENIZERS[key] = data_setup.make_tokenizer(config)
  return _TOKENIZERS[key]


def dims(config) -> tuple[int, int]:
  """(P, C): static prompt and response positions of an RL row (text: rl.prompt_len, rl.gen_length)."""
  if config.rl.task == "t2i":
    return t2i_lib.dims(config)
  return int(config.rl.prompt_len), int(config.rl.gen_length)


def _abstract_batch(config, b: int) -> dict:
  """Shapes of an RL batch (before the precompute) — enough to build its shardings."""
  r = config.rl
  p, c = dims(config)
  mu, k, length = int(r.inner_steps), int(r.masks_per_step), p + c
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {"tokens": s(b, length), "attn": s(b, length), "maskable": s(b, c), "eligible": s(b, c), "adv": s(b),
          "row_weight": s(b), "uid": s(b), "ratios": s(mu, k, b), "mask_key": s(2)}


def _is_param_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "metadata")) and os.path.isdir(os.path.join(path, "params"))


def _reference(config, workdir: str, state, shardings, resumed_handle: str | None, log) -> tuple[Any, str]:
  """(frozen reference params sharded like the policy, handle).

  A fresh run's reference is its initial policy (π_θ ← π_ref, Algorithm 1): the handle is `train.init_from` when that
  is a parameter checkpoint, otherwise (random weights, or another run's workdir whose latest step may still move) a
  copy is saved to WORKDIR/reference. A resumed run reloads the reference from its saved handle.
  """
  if resumed_handle:
    expect = {"model.num_layers": config.model.num_layers, "model.d_model": config.model.d_model,
              "model.vocab_size": config.model.vocab_size}
    params, _ = ckpt.load_params(resumed_handle, expected=expect, shardings=shardings.params)
    return jax.tree.map(lambda p, a: p.astype(a.dtype), params, state.params), resumed_handle
  ref = step_lib.frozen_copy(state.params, shardings.params)
  init = config.train.init_from
  if init and _is_param_checkpoint(init):
    return ref, os.path.abspath(init)
  handle = os.path.join(os.path.abspath(workdir), REFERENCE_DIR)
  if not os.path.exists(handle):
    ckpt.save_params(handle, jax.device_get(ref), ckpt.backbone_metadata(config))
    log(f"saved the reference policy to {handle}")
  return ref, handle


def setup(config, workdir: str, log: Callable[[str], None] = print) -> RLRun:
  """Mesh, model, sharded policy state (resumed when the workdir has a checkpoint), reference, prompts, jitted fns."""
  t2i = config.rl.task == "t2i"
  if t2i:
    t2i_lib.check(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  b = int(config.rl.prompts_per_step) * int(config.rl.group_size)
  batch_sh = step_lib.batch_shardings(_abstract_batch(config, b), mesh, rules)  # rows vs batch shards, before compiling
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  checkpointer = ckpt.TrainCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  tokenizer = _tokenizer(config)
  prompts = ToyWorldPrompts(config, tokenizer)
  guard = faults.NumericsGuard.from_config(config.train, what="rl")
  rl_step, handle = 0, None
  found = checkpointer.restore_latest(abstract, train_loop.config_json(config), log=log)
  if found is not None:
    _, state, data_state, _ = found
    prompts.set_state(data_state.get("prompts", {}))
    guard.set_state(data_state.get("loop"))
    rl_step, handle = int(data_state["rl_step"]), data_state["reference"]
    handle = os.path.join(os.path.abspath(workdir), handle) if handle == REFERENCE_DIR else handle
    log(f"resumed from {checkpointer.directory} at RL step {rl_step}")
  else:
    state = train_loop.initial_state(config, model, tx, mesh, rules, abstract, shardings, log)
  ref, handle = _reference(config, workdir, state, shardings, handle, log)
  settings = step_lib.StepSettings.from_config(config, vocab_slice=t2i_lib.vocab_slice(config) if t2i else None)
  fns = _functions(config, model, tx, mesh, rules, shardings, settings, batch_sh)
  return RLRun(config, workdir, mesh, rules, model, tokenizer, vocab_lib.Vocab.from_config(config.vocab), state,
               shardings, ref if settings.loss.beta > 0 else None, handle, prompts, checkpointer,
               rewards_lib.RewardModel.from_config(config.rl), settings, fns, rl_step, guard,
               t2i_lib.image_tokenizer(config, log) if t2i else None)


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts and the RL batch


def sampler_settings(config, greedy: bool = False) -> sampling_text.TextSampling:
  r = config.rl
  return sampling_text.TextSampling(gen_length=int(r.gen_length), block_length=int(r.block_length),
                                    steps=int(r.rollout_steps), temperature=0.0 if greedy else float(r.temperature),
                                    remasking="low_confidence" if greedy else str(r.remasking))


def rollout(run: RLRun, records: list[dict], key, greedy: bool = False) -> dict:
  """Generates one response per record → prompt ids/mask [B, P], responses [B, C] (numpy) and the decoded samples.
  (t2i: the image sampler with `sampling.image`; `greedy` does not apply.)"""
  if run.config.rl.task == "t2i":
    return t2i_lib.rollout(run, records, key, run.images)
  ids, mask = pad_prompts([r["prompt_ids"] for r in records], int(run.config.rl.prompt_len), run.vocab.pad_id)
  with partitioning.axis_rules(run.mesh, run.rules):
    out = sampling_text.generate(run.model, run.state.params, ids, mask, mask_id=run.vocab.mask_id,
                                 settings=sampler_settings(run.config, greedy), rng=key)
  tokens = np.asarray(jax.device_get(out["tokens"]))
  response = tokens[:, ids.shape[1]:]
  terms = (run.vocab.eos_id, run.vocab.eot_id)
  first = np.asarray(masks_lib.first_terminator(jnp.asarray(response), terms))
  samples = [{"response": decode(run, response[i, :first[i]]), "answer": r["answer"], "prompt": r["prompt"],
              "id": r["id"], "truncated": bool(first[i] >= response.shape[1]), "length": int(first[i])}
             for i, r in enumerate(records)]
  return {"ids": ids, "mask": mask, "response": response, "samples": samples}


def decode(run: RLRun, ids: np.ndarray) -> str:
  """Response ids before the first terminator → text as the held-out evaluation reads it ([MASK] and special tokens
  dropped; `<think>` markers are ordinary ToyWorld tokens)."""
  return run.tokenizer.decode([int(i) for i in ids if int(i) != run.vocab.mask_id], skip_special_tokens=True)


def build_batch(config, roll: dict, adv: dict, rl_step: int, key) -> dict:
  """The host RLBatch (numpy; `step.py` module docstring) of one rollout batch."""
  r = config.rl
  b, c = roll["response"].shape
  v = config.vocab
  if r.task == "t2i":
    maskable, eligible = t2i_lib.positions(roll["response"])
  else:
    maskable, eligible = masks_lib.response_positions(jnp.asarray(roll["response"]), (int(v.eos_id), int(v.eot_id)),
                                                      loss_tail=str(r.loss_tail), mask_tail=bool(r.mask_tail))
  uid = (rl_step * b + np.arange(b)).astype(np.int32)
  mode = "d1" if r.estimator == "d1" else str(r.schedule)
  ratios = schedule.multi_mask_ratios(jax.random.fold_in(key, SCHEDULE_TAG), jnp.asarray(uid), int(r.inner_steps),
                                      int(r.masks_per_step), mode=mode, T=int(r.schedule_T),
                                      shared=bool(r.schedule_shared), ratio_range=tuple(r.ratio_range),
                                      p_min=float(r.p_min))
  tokens = np.concatenate([roll["ids"], roll["response"]], axis=1).astype(np.int32)
  attn = np.concatenate([roll["mask"], np.ones((b, c), np.int32)], axis=1).astype(np.int32)
  return {"tokens": tokens, "attn": attn, "maskable": np.asarray(maskable), "eligible": np.asarray(eligible),
          "adv": adv["adv"], "row_weight": adv["row_weight"], "uid": uid, "ratios": np.asarray(ratios),
          "mask_key": np.asarray(jax.random.key_data(jax.random.fold_in(key, MASK_TAG)))}


def place(batch: dict, shardings: dict) -> dict:
  """Host arrays → global device arrays on the RL batch shardings (single-process; every host holds the whole batch)."""
  return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# One RL step


def select_groups(zero_std: np.ndarray, q: int) -> np.ndarray:
  """Indices (ascending) of the q groups an over-sampled step trains on: groups whose rewards differ first, in draw
  order, then zero-std groups (which carry no signal) to fill the static batch."""
  zero_std = np.asarray(zero_std, bool)
  if zero_std.shape[0] < q:
    raise ValueError(f"need at least {q} groups to choose from, got {zero_std.shape[0]}")
  order = np.concatenate([np.flatnonzero(~zero_std), np.flatnonzero(zero_std)])
  return np.sort(order[:q])


def _take_rows(tree: dict, rows: np.ndarray) -> dict:
  """The given rows of a rollout dict / score dict (numpy arrays and lists, batch axis 0)."""
  return {k: [v[i] for i in rows] if isinstance(v, list) else np.asarray(v)[rows] for k, v in tree.items()}


def _concat_rows(parts: list[dict]) -> dict:
  return {k: sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else
          np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def rl_step(run: RLRun, log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
  """Rollout → rewards → precompute → μ policy steps. Returns (metrics, dumped samples with their rewards).

  With `rl.oversample` = F > 1 (dynamic sampling, as DAPO): F·Q prompts are rolled out (F batches of the usual shape)
  and the Q groups trained on are those whose rewards differ (`select_groups`), so fewer rows carry no signal; which
  rewards must differ is `rl.oversample_by` (the total, or the accuracy alone as DAPO, where a group whose images
  differ only in partial attribute scores is not enough). The reward / accuracy metrics cover every rollout (the
  policy on fresh prompts); `kept_zero_std_frac` is the share of trained groups whose total rewards carry none, and
  `kept_by_spread_frac` the share with a spread in `rl.oversample_by`.
  """
  r = run.config.rl
  q, g, mu, f = int(r.prompts_per_step), int(r.group_size), int(r.inner_steps), int(r.oversample)
  key = jax.random.fold_in(jax.random.key(int(r.seed)), run.rl_step)
  drawn = run.prompts.next(q * f)
  t0 = time.perf_counter()
  rolls, all_scores = [], []
  for j in range(f):  # the first batch uses the key of a plain step, so F = 1 is exactly the paper's loop
    rkey = jax.random.fold_in(key, ROLLOUT_TAG)
    part = rollout(run, [rec for rec in drawn[j * q:(j + 1) * q] for _ in range(g)],
                   rkey if j == 0 else jax.random.fold_in(rkey, j))
    rolls.append(part)
    all_scores.append(run.rewards(part["samples"]))
  t1 = time.perf_counter()
  roll_all, scores_all = _concat_rows(rolls), _concat_rows(all_scores)
  adv_all = obj.group_advantages(scores_all["total"], g, std=bool(r.adv_std), eps=float(r.adv_eps),
                                 filter_zero_std=bool(r.filter_zero_std))
  if f == 1:
    roll, scores, adv = roll_all, scores_all, adv_all
  else:
    by = str(r.oversample_by)
    no_spread = (adv_all["zero_std"] if by == "total" else
                 obj.group_advantages(scores_all[by], g, eps=float(r.adv_eps))["zero_std"])
    groups = select_groups(no_spread, q)
    rows = (groups[:, None] * g + np.arange(g)[None]).reshape(-1)
    roll, scores = _take_rows(roll_all, rows), _take_rows(scores_all, rows)
    adv = dict(adv=adv_all["adv"][rows], row_weight=adv_all["row_weight"][rows], zero_std=adv_all["zero_std"][groups])
  batch = place(build_batch(run.config, roll, adv, run.rl_step, key), run.fns["batch_shardings"])
  with partitioning.axis_rules(run.mesh, run.rules):
    batch.update(run.fns["precompute"](run.state.params, run.ref_params, batch))
    per_iter = []
    for n in range(mu):
      run.state, m = run.fns["step"](run.state, batch, jnp.int32(n))
      per_iter.append(m)
  per_iter = jax.device_get(per_iter)
  t2 = time.perf_counter()
  run.rl_step += 1
  guard = run.guard or faults.NumericsGuard.from_config(run.config.train, what="rl")
  run.guard = guard
  for n, m in enumerate(per_iter):  # skipped (non-finite) policy steps, counted per optimiser step
    booked = guard.update((run.rl_step - 1) * mu + n + 1, float(m["loss"]), float(m["finite"]) > 0, log)
  metrics = _step_metrics(per_iter, scores_all, adv_all, roll_all, run.rewards.names)
  metrics.update(booked, adv_abs=float(np.mean(np.abs(adv["adv"]))))
  if f > 1:
    metrics["kept_zero_std_frac"] = float(np.mean(adv["zero_std"]))
    metrics["kept_by_spread_frac"] = float(np.mean(~no_spread[groups]))
  metrics.update(rollout_s=t1 - t0, update_s=t2 - t1, optimizer_step=float(jax.device_get(run.state.step)))
  dumps = [dict({k: v for k, v in s.items() if k != "record"}, **{k: float(v[i]) for k, v in scores.items()},
                advantage=float(adv["adv"][i]))
           for i, s in enumerate(roll["samples"][:int(r.dump_count)])]
  return metrics, dumps


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


def evaluate(run: RLRun, count: int) -> dict:
  """Held-out rewards and accuracy on the first `count` test prompts (batches of the rollout size): greedy text
  answers; t2i images drawn with a fixed key. With `rl.eval_samples` = k > 0 each prompt is also answered k more times
  with other fixed keys, as `eval_sampled_*`: text sampled like the rollouts (temperature `rl.temperature`), the
  policy that RL optimises, whose accuracy a greedy evaluation of an already-confident model hides; t2i k more images
  per prompt, which shrinks the sampling noise of one image each. `eval_accuracy_se` / `eval_sampled_accuracy_se`:
  the standard error of the accuracy over the prompts (per-prompt means of the k answers for the sampled one)."""
  held = ToyWorldPrompts(run.config, run.tokenizer, split="test")
  records = [held.record(i) for i in range(count)]
  out = _summary(_scores(run, records, greedy=True, tag=EVAL_TAG), "eval", 1)
  k = int(run.config.rl.eval_samples)
  if k:
    repeated = [r for r in records for _ in range(k)]
    out.update(_summary(_scores(run, repeated, greedy=False, tag=SAMPLED_EVAL_TAG), "eval_sampled", k))
  return out


def _summary(scores: dict, prefix: str, k: int) -> dict:
  """Means of per-record scores (k consecutive records per prompt) and the standard error of the accuracy over the
  prompts."""
  out = {f"{prefix}_{name}": float(np.mean(v)) for name, v in scores.items()}
  per_prompt = np.asarray(scores["accuracy"], np.float64).reshape(-1, k).mean(axis=1)
  out[f"{prefix}_accuracy_se"] = float(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt))) if len(
      per_prompt) > 1 else 0.0
  return out


def _scores(run: RLRun, records: list[dict], greedy: bool, tag: int) -> dict:
  """Each reward component (and accuracy) per record of `records`, rolled out in batches of the rollout size."""
  b = int(run.config.rl.prompts_per_step) * int(run.config.rl.group_size)
  scores: dict[str, list] = {}
  for start in range(0, len(records), b):
    chunk = records[start:start + b]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (b - n)  # static batch shape: pad with repeats, dropped below
    key = jax.random.fold_in(jax.random.key(tag), start)  # greedy text: unused
    out = run.rewards(rollout(run, chunk, key, greedy=greedy)["samples"])
    for name, v in out.items():
      scores.setdefault(name, []).extend(v[:n].tolist())
  return scores


# ----------------------------------------------------------------------------------------------------------------------
# The driver


def _save(run: RLRun, force: bool) -> None:
  own = os.path.join(os.path.abspath(run.workdir), REFERENCE_DIR)
  handle = REFERENCE_DIR if run.ref_handle == own else run.ref_handle  # the workdir may move
  data = {"prompts": run.prompts.get_state(), "rl_step": run.rl_step, "reference": handle,
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
    from mmada_jax.models import image_io

    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    image_io.save_grid(np.stack(images), os.path.join(workdir, "samples", f"rl_step_{rl_step}.png"))
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    for d in dumps:
      f.write(json.dumps({"rl_step": rl_step, **d}) + "\n")


def train(run: RLRun, log: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Runs RL steps until `rl.steps`; checkpoints every `checkpoint.save_every_steps` RL steps and at the end.

  Returns the last logged metrics (held-out `eval_*` included when `rl.eval_prompts` > 0).
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
      writer.write(0, _evaluate_and_log(run, 0, log))
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


def _evaluate_and_log(run: RLRun, step: int, log) -> dict:
  t0 = time.perf_counter()
  scores = evaluate(run, int(run.config.rl.eval_prompts))
  parts = [f"{name} {scores[f'{prefix}_accuracy']:.4f} ± {scores[f'{prefix}_accuracy_se']:.4f}"
           for prefix, name in (("eval", "accuracy"), ("eval_sampled", "sampled")) if f"{prefix}_accuracy" in scores]
  log(f"held-out evaluation at RL step {step} ({run.config.rl.eval_prompts} prompts, {time.perf_counter() - t0:.0f} s): "
      + ", ".join(parts))
  return scores


def _one_step(run: RLRun, writer, bar, log) -> tuple[dict, bool]:
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
    scores = _evaluate_and_log(run, step, log)
    writer.write(step, scores)
    metrics = dict(metrics, **scores)
  saved = step % int(config.checkpoint.save_every_steps) == 0 or step == total
  if saved:
    _save(run, force=step == total)
    faults.inject("kill_after_save", step)
  return metrics, saved


def main_rl(argv: list[str]) -> int:
  """`mmada-jax rl --config FILE --workdir DIR [--init_from CKPT] [--no_progress] [--config.key=value ...]`."""
  path, overrides, rest = config_lib.split_config_args(argv)
  p = argparse.ArgumentParser(prog="mmada-jax rl", description="UniGRPO reinforcement learning (or resume a run in "
                                                               "WORKDIR) with an experiment config.")
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, samples.jsonl")
  p.add_argument("--init_from", default=None, help="parameter checkpoint of the starting policy and reference (sets "
                                                   "train.init_from)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = p.parse_args(rest)
  if path is None:
    raise config_lib.ConfigError("--config FILE is required (e.g. experiments/toyworld_rl.py:text)")
  if args.init_from:
    overrides["train.init_from"] = args.init_from
  config = config_lib.load_config(path, overrides)
  print(config, flush=True)
  run = setup(config, args.workdir)
  last = train(run, progress=not args.no_progress)
  print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0
