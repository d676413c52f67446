"""Rollouts and the RL batch (steps 2–4 of specs/unigrpo.md §6.1): responses from the policy, the choice of the groups
an over-sampled step trains on, and the host RLBatch with its mask-ratio schedule.

Keys: every random draw of an RL step comes from its key `fold_in(key(rl.seed), rl_step)` folded with one of the tags
below, so a resumed run repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from mmada_jax.diffusion import sampling_text
from mmada_jax.parallel import partitioning
from mmada_jax.rl import masks as masks_lib, objective as obj, schedule, t2i as t2i_lib
from mmada_jax.rl.prompts import PromptRecord, pad_prompts
from mmada_jax.rl.setup import RLRun

SCHEDULE_TAG, MASK_TAG, ROLLOUT_TAG, EVAL_TAG, SAMPLED_EVAL_TAG = 0, 1, 2, 3, 4  # fold_in tags of the RL keys


def sampler_settings(config: ml_collections.ConfigDict, greedy: bool = False) -> sampling_text.TextSampling:
  """The text rollout sampler (`rl.temperature`, `rl.remasking`); greedy: temperature 0, low-confidence commits."""
  r = config.rl
  return sampling_text.TextSampling(gen_length=int(r.gen_length), block_length=int(r.block_length),
                                    steps=int(r.rollout_steps), temperature=0.0 if greedy else float(r.temperature),
                                    remasking="low_confidence" if greedy else str(r.remasking))


def rollout(run: RLRun, records: list[PromptRecord], key: jax.Array, greedy: bool = False) -> dict:
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


def rollout_groups(run: RLRun, drawn: list[PromptRecord], key: jax.Array) -> tuple[dict, dict]:
  """Rolls out F = len(drawn) / Q batches of Q prompts × G (rows group-major) and scores them →
  (rollouts, rewards), each concatenated over the F batches ([F·Q·G] rows)."""
  r = run.config.rl
  q, g = int(r.prompts_per_step), int(r.group_size)
  rolls, all_scores = [], []
  for j in range(len(drawn) // q):  # the first batch uses the key of a plain step, so F = 1 is exactly the paper's loop
    rkey = jax.random.fold_in(key, ROLLOUT_TAG)
    part = rollout(run, [rec for rec in drawn[j * q:(j + 1) * q] for _ in range(g)],
                   rkey if j == 0 else jax.random.fold_in(rkey, j))
    rolls.append(part)
    all_scores.append(run.rewards(part["samples"]))
  return concat_rows(rolls), concat_rows(all_scores)


def select_groups(zero_std: np.ndarray, q: int) -> np.ndarray:
  """Indices (ascending) of the q groups an over-sampled step trains on: groups whose rewards differ first, in draw
  order, then zero-std groups (which carry no signal) to fill the static batch."""
  zero_std = np.asarray(zero_std, bool)
  if zero_std.shape[0] < q:
    raise ValueError(f"need at least {q} groups to choose from, got {zero_std.shape[0]}")
  order = np.concatenate([np.flatnonzero(~zero_std), np.flatnonzero(zero_std)])
  return np.sort(order[:q])


def trained_rows(config: ml_collections.ConfigDict, roll: dict, scores: dict,
                 adv: dict) -> tuple[dict, dict, dict, dict[str, float]]:
  """The rows a step trains on → (rollouts, rewards, advantages, selection metrics): with `rl.oversample` = 1 all of
  them; with F > 1 the Q groups of the F·Q rolled out (`select_groups`) whose rewards in `rl.oversample_by` differ
  (rows [Q·G], advantages of the whole draw), and `kept_zero_std_frac` / `kept_by_spread_frac`."""
  r = config.rl
  q, g = int(r.prompts_per_step), int(r.group_size)
  if int(r.oversample) == 1:
    return roll, scores, adv, {}
  by = str(r.oversample_by)
  no_spread = (adv["zero_std"] if by == "total" else
               obj.group_advantages(scores[by], g, eps=float(r.adv_eps))["zero_std"])
  groups = select_groups(no_spread, q)
  rows = (groups[:, None] * g + np.arange(g)[None]).reshape(-1)
  kept = dict(adv=adv["adv"][rows], row_weight=adv["row_weight"][rows], zero_std=adv["zero_std"][groups])
  metrics = {"kept_zero_std_frac": float(np.mean(kept["zero_std"])),
             "kept_by_spread_frac": float(np.mean(~no_spread[groups]))}
  return take_rows(roll, rows), take_rows(scores, rows), kept, metrics


def take_rows(tree: dict, rows: np.ndarray) -> dict:
  """The given rows of a rollout dict / score dict (numpy arrays and lists, batch axis 0)."""
  return {k: [v[i] for i in rows] if isinstance(v, list) else np.asarray(v)[rows] for k, v in tree.items()}


def concat_rows(parts: list[dict]) -> dict:
  """Rollout / score dicts concatenated along the batch axis (lists joined, arrays concatenated)."""
  return {k: sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else
          np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def build_batch(config: ml_collections.ConfigDict, roll: dict, adv: dict, rl_step: int, key: jax.Array) -> dict:
  """The host RLBatch (numpy; `step.py` module docstring) of one rollout batch: roll["ids"] / ["mask"] [B, P],
  roll["response"] [B, C], adv["adv"] / ["row_weight"] [B]."""
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


def place(batch: dict, shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
  """Host arrays → global device arrays on the RL batch shardings (single-process; every host holds the whole batch)."""
  return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
