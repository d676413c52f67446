"""The MMaDA training objective: one forward pass over `[t2i; lm; mmu]` rows, three losses as (numerator, denominator).
(With `data.lm_seq_len` the lm rows are shorter than L and get a forward pass of their own.)

Losses (specs/mmada-official.md §4.3, docs/parity.md §6), with CE the natural-log cross-entropy over
the full vocabulary, M = (noisy id == [MASK]) & (label != -100), p the row's masking probability and A its answer
length Σ(1 - prompt_mask):

  t2i            Σ CE over t2i positions l >= S+1 with a label (masked image tokens, <soi>, <eoi>)  ÷  their count
  lm (tokens)    Σ M·CE/p                                                                           ÷  B_lm · L
  lm (answer)    Σ M·CE/p/A                                                                         ÷  B_lm
  mmu            Σ M·CE/p/A                                                                         ÷  B_mmu

`loss.lm_normalisation` picks the lm form: "tokens" = pre-training stages 1.1/1.2, "answer" = instruction / Mix-CoT
stages (a plain-text row has A = L, so it gets the same weight under both). Numerators are sums over rows, so gradient
accumulation and data parallelism add numerators and denominators separately and divide once (Decision 5); the
denominators depend on the masks only. A task without rows gives (0, 0) and `combine` counts it as 0 — unlike the
official `masked_indices[-batch_size_mmu:]`, which selects every row when the mmu batch is empty (§8.13).

Attention inside the pass (`loss.attention`, §4.5, §8.1):
  float_bias  the official training code: a float 0/1 pair product of the t2i valid mask *added* to the scores (pairs
              with an [iPAD] key get +0 instead of +1, i.e. weight e^-1, nothing is masked); lm/mmu rows get +1
              everywhere (no masking). Reproduces the official losses, hence the default.
  key_mask    hard key-padding mask from every row's `valid_mask`: padded keys are excluded, every query is computed.
  pair_mask   the samplers' boolean pair mask valid ⊗ valid (padded query rows become uniform; they carry no t2i loss).
  none        no mask at all (the public code before commit 0ef94ba).

The LM head never produces fp32 logits for the whole batch (`loss.head`): "gather" compacts the loss-bearing positions
of each group of rows into a static buffer (`head_capacity` of the group's positions) and evaluates the head there,
chunk by chunk; if any group has more loss positions than the buffer holds, a `lax.cond` takes the "chunked" path
instead, which evaluates every position in chunks of `head_chunk` positions per row. Both are exact. When there are
several chunks each is rematerialised in the backward pass, so at most `[rows, head_chunk, vocab]` fp32 logits (plus
their gradient) are alive at once. "full" builds `[batch, length, vocab]` logits (a reference for tests and tiny
vocabularies).
On a mesh, set `head_groups` to the number of batch shards (the default 0 = the device count) so compaction stays
within a shard; `head_overflow` in the metrics counts fallbacks (raise `head_capacity` if it is often 1).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mmada_jax.diffusion import corruption
from mmada_jax.models import llada

Array = jax.Array
TASKS = corruption.TASKS
IGNORE_ID = corruption.IGNORE_ID
ATTENTION_CONVENTIONS = ("float_bias", "key_mask", "pair_mask", "none")
HEAD_STRATEGIES = ("gather", "chunked", "full")
Terms = dict[str, tuple[Array, Array]]


def coefficients(config: Any) -> dict[str, float]:
  """Stage loss weights `{"t2i": ., "lm": ., "mmu": .}` from `config.loss.coeff_<task>`."""
  return {t: float(config.loss[f"coeff_{t}"]) for t in TASKS}


# ----------------------------------------------------------------------------------------------------------------------
# The concatenated batch


def _parts(corrupted: Mapping[str, Mapping[str, Array]]) -> list[tuple[str, Mapping[str, Array]]]:
  """Present tasks in batch order; checks that every task has `[rows, length]` ids and that t2i and mmu share L."""
  unknown = sorted(set(corrupted) - set(TASKS))
  if unknown:
    raise KeyError(f"batch has unknown tasks {unknown}, expected a subset of {TASKS}")
  parts = [(t, corrupted[t]) for t in TASKS if t in corrupted]
  if not parts:
    raise ValueError(f"the batch holds none of the tasks {TASKS}")
  shapes = {t: a["input_ids"].shape for t, a in parts}
  if any(len(s) != 2 for s in shapes.values()):
    raise ValueError(f"every task's input_ids must be [rows, length], got {shapes}")
  if "t2i" in shapes and "mmu" in shapes and shapes["t2i"][1] != shapes["mmu"][1]:
    raise ValueError(f"t2i and mmu rows must have the same length L = S + N + 3, got {shapes}")
  return parts


def _length_groups(parts) -> list[list[tuple[str, Mapping[str, Array]]]]:
  """The tasks grouped by row length (batch order kept): one forward pass per group. All tasks share L unless
  `data.lm_seq_len` gives the lm rows their own length."""
  groups: dict[int, list] = {}
  for task, a in parts:
    groups.setdefault(a["input_ids"].shape[1], []).append((task, a))
  return list(groups.values())


def attention_mask_for(parts, convention: str) -> Array | None:
  """The model's `attention_mask` argument for the concatenated rows (see the module docstring).

  Returns None, a `[batch, length]` padding mask, or a `[batch, 1, length, length]` float bias / bool mask.
  """
  if convention == "none":
    return None
  if convention == "float_bias":
    if not any(t == "t2i" for t, _ in parts):
      return None  # all-ones float bias: a constant shift of every score, softmax-invariant
    if "valid_mask" not in dict(parts)["t2i"]:
      raise KeyError("loss.attention='float_bias' needs `valid_mask` in batch['t2i']")
    m = jnp.concatenate([a["valid_mask"].astype(jnp.float32) if t == "t2i" else
                         jnp.ones(a["input_ids"].shape, jnp.float32) for t, a in parts])
    return (m[:, :, None] * m[:, None, :])[:, None]
  missing = [t for t, a in parts if "valid_mask" not in a]
  if missing:
    raise KeyError(f"loss.attention={convention!r} needs `valid_mask` in batch{missing}")
  valid = jnp.concatenate([a["valid_mask"].astype(bool) for _, a in parts])
  if convention == "pair_mask":
    return valid
  if convention == "key_mask":
    b, length = valid.shape
    return jnp.broadcast_to(valid[:, None, None, :], (b, 1, length, length))
  raise ValueError(f"loss.attention must be one of {ATTENTION_CONVENTIONS}, got {convention!r}")


def _per_row(x: Array, rows: int, length: int) -> Array:
  """A per-row `[rows]` or per-position `[rows, L]` array as `[rows, L]`-broadcastable fp32."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 1:
    return x[:, None]
  if x.shape != (rows, length):
    raise ValueError(f"expected [rows] or [rows, L] = [{rows}] or [{rows}, {length}], got shape {x.shape}")
  return x


def position_weights(task: str, arrays: Mapping[str, Array], *, mask_id: int, text_len: int,
                     lm_normalisation: str) -> Array:
  """Weight of every position's CE in the task's numerator, `[rows, L]` fp32 (0 = no loss there).

  t2i: 1 at positions l >= text_len + 1 with a label; lm/mmu: M/p (lm "tokens") or M/p/A (lm "answer", mmu), where
  `p_mask` and `answer_len` may be `[rows]` or `[rows, L]`.
  """
  ids, labels = arrays["input_ids"], arrays["labels"]
  rows, length = ids.shape
  has_label = labels != IGNORE_ID
  if task == "t2i":
    region = jnp.arange(length) >= text_len + 1
    return (has_label & region[None]).astype(jnp.float32)
  needed = ("p_mask", "answer_len") if task == "mmu" or lm_normalisation == "answer" else ("p_mask",)
  missing = [k for k in needed if k not in arrays]
  if missing:
    raise KeyError(f"batch[{task!r}] lacks {missing} (has {sorted(arrays)})")
  m = ((ids == mask_id) & has_label).astype(jnp.float32)
  w = m / _per_row(arrays["p_mask"], rows, length)
  if task == "mmu" or lm_normalisation == "answer":
    w = w / _per_row(arrays["answer_len"], rows, length)
  return w


def denominators(corrupted: Mapping[str, Mapping[str, Array]], config: Any) -> dict[str, Array]:
  """Per-task denominators `{task: fp32 scalar}` of a corrupted batch (0 for a task without rows or absent)."""
  out = {t: jnp.zeros((), jnp.float32) for t in TASKS}
  text_len = int(config.data.max_text_len)
  for task, a in _parts(corrupted):
    rows, length = a["input_ids"].shape
    if task == "t2i":
      region = jnp.arange(length) >= text_len + 1
      out[task] = jnp.sum((a["labels"] != IGNORE_ID) & region[None]).astype(jnp.float32)
    elif task == "lm" and config.loss.lm_normalisation == "tokens":
      out[task] = jnp.float32(rows * length)
    else:
      out[task] = jnp.float32(rows)
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Cross-entropy at selected positions without full logits


def _ce_chunks(kernel: Array, h: Array, labels: Array, chunk: int, args) -> Array:
  """CE `[G, P]` for hidden states h `[G, P, d]` and labels `[G, P]`, evaluating `[G, chunk, vocab]` logits at a time.

  With several chunks each one is rematerialised in the backward pass, so logits are never stored across chunks.
  """
  g, p, d = h.shape
  n = -(-p // chunk)
  pad = n * chunk - p
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))
  labels = jnp.clip(labels, 0, kernel.shape[-1] - 1)

  def one(hc, lc):
    logits = llada.head_logits(kernel, hc, args)  # [G, chunk, vocab] fp32
    picked = jnp.take_along_axis(logits, lc[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked

  if n == 1:  # a single chunk: keeping its residuals costs no more memory than recomputing it, and less time
    return one(h, labels)[:, :p]
  hs = h.reshape(g, n, chunk, d).swapaxes(0, 1)
  ls = labels.reshape(g, n, chunk).swapaxes(0, 1)
  one = jax.checkpoint(one)
  ce = jax.lax.map(lambda xs: one(*xs), (hs, ls))  # [n, G, chunk]
  return ce.swapaxes(0, 1).reshape(g, n * chunk)[:, :p]


def _gathered_ce(kernel, hg, lg, mg, cap: int, chunk: int, args) -> Array:
  """CE `[G, P]` (0 off the mask) from the first `cap` masked positions of every group (`hg [G, P, d]`)."""
  g, p, _ = hg.shape
  idx = jax.vmap(lambda m: jnp.nonzero(m, size=cap, fill_value=0)[0])(mg)  # [G, cap]
  valid = jnp.arange(cap)[None] < jnp.sum(mg, axis=-1, keepdims=True)
  hs = jax.vmap(lambda a, i: a[i])(hg, idx)  # [G, cap, d]
  ls = jnp.take_along_axis(lg, idx, axis=1)
  ce = jnp.where(valid, _ce_chunks(kernel, hs, ls, chunk, args), 0.0)
  return jax.vmap(lambda i, v: jnp.zeros((p,), jnp.float32).at[i].add(v))(idx, ce)


def _groups(rows: int, groups: int) -> int:
  """Row groups for compaction: gcd(rows, groups), groups = 0 meaning the number of devices (one group per batch shard
  on a data-parallel mesh, so compaction stays on one device)."""
  return math.gcd(rows, groups if groups > 0 else jax.device_count()) or 1


def token_ce(kernel: Array, h: Array, labels: Array, loss_mask: Array, args, *, head: str = "gather",
             chunk: int = 128, capacity: float = 0.6, groups: int = 0) -> tuple[Array, Array]:
  """Cross-entropy at the loss-bearing positions, exactly, without fp32 logits for the whole batch.

  Args:
    kernel: LM head `[embed, vocab]`; h: final hidden states `[batch, length, embed]`; labels `[batch, length]`
      (any value off the mask); loss_mask `[batch, length]` bool; args: the model's ModelArgs.
    head: "gather", "chunked" or "full" (module docstring); chunk: positions per row per head evaluation;
    capacity: gather buffer as a fraction of a group's positions; groups: row groups for the gather (0 = auto).

  Returns:
    CE `[batch, length]` fp32 (0 off the mask) and `overflow` (int32 scalar, 1 when "gather" fell back to "chunked").
  """
  b, length, _ = h.shape
  zero = jnp.zeros((), jnp.int32)
  if head == "full":
    logits = llada.head_logits(kernel, h, args)
    safe = jnp.clip(labels, 0, kernel.shape[-1] - 1)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(loss_mask, ce, 0.0), zero
  chunked = lambda: jnp.where(loss_mask, _ce_chunks(kernel, h, labels, min(chunk, length), args), 0.0)
  if head == "chunked":
    return chunked(), zero
  if head != "gather":
    raise ValueError(f"loss.head must be one of {HEAD_STRATEGIES}, got {head!r}")
  g = _groups(b, groups)
  p = (b // g) * length
  cap = min(p, max(1, math.ceil(capacity * p)))
  n_chunks = -(-cap // (chunk * (b // g)))
  per_chunk = -(-cap // n_chunks)
  cap = n_chunks * per_chunk
  if cap >= p:
    return chunked(), zero
  mg = loss_mask.reshape(g, p)
  overflow = jnp.any(jnp.sum(mg, axis=-1) > cap)
  gathered = lambda: _gathered_ce(kernel, h.reshape(g, p, -1), labels.reshape(g, p), mg, cap, per_chunk,
                                  args).reshape(b, length)
  ce = jax.lax.cond(overflow, chunked, gathered)
  return ce, overflow.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Numerators and the entry points


def numerators(params: Any, corrupted: Mapping[str, Mapping[str, Array]], *, model, config: Any,
               per_row: bool = False):
  """One forward pass over the concatenated rows (one per row length, see `_length_groups`); per-task numerators
  (sums, additive over micro-batches).

  Args:
    params: model parameters; corrupted: `{task: arrays}` as `corruption.corrupt_batch` returns them — `input_ids`
      (noisy), `labels`, `valid_mask` `[rows, L]`, plus `p_mask` (lm, mmu) and `answer_len` (mmu; lm when
      `loss.lm_normalisation == "answer"`) as `[rows]` or `[rows, L]`. Any masks/p can be fed here (parity tests).
    model: the `llada.Transformer`; config: the full config (`loss`, `vocab.mask_id`, `data.max_text_len`).
    per_row: also return `{task: [rows] numerator per row}`.

  Returns:
    `(nums, aux)` — nums `{task: fp32 scalar}` for all three tasks (0 for absent ones); aux additive metrics
    `masked_tokens_<task>` ([MASK] inputs), `loss_tokens_<task>` (positions whose CE enters the numerator) and
    `head_overflow` (1 when the gathered head fell back to the chunked one) — and `{task: [rows]}` when `per_row`.
  """
  lc = config.loss
  parts = _parts(corrupted)
  nums = {t: jnp.zeros((), jnp.float32) for t in TASKS}
  aux = {f"{k}_{t}": jnp.zeros((), jnp.float32) for k in ("masked_tokens", "loss_tokens") for t in TASKS}
  aux["head_overflow"] = jnp.zeros((), jnp.float32)
  if sum(a["input_ids"].shape[0] for _, a in parts) == 0:  # every present task has 0 rows: nothing to run
    rows_out = {t: jnp.zeros((0,), jnp.float32) for t, _ in parts}
    return (nums, aux, rows_out) if per_row else (nums, aux)
  rows_out, overflow = {}, jnp.zeros((), jnp.int32)
  for group in _length_groups(parts):
    ids = jnp.concatenate([a["input_ids"] for _, a in group]).astype(jnp.int32)
    labels = jnp.concatenate([a["labels"] for _, a in group]).astype(jnp.int32)
    weights = [position_weights(t, a, mask_id=int(config.vocab.mask_id), text_len=int(config.data.max_text_len),
                                lm_normalisation=str(lc.lm_normalisation)) for t, a in group]
    w = jnp.concatenate(weights)
    h = model.apply({"params": params}, ids, attention_mask_for(group, str(lc.attention)), output="hidden")
    ce, over = token_ce(llada.head_kernel(params), h, labels, w != 0, model.args, head=str(lc.head),
                        chunk=int(lc.head_chunk), capacity=float(lc.head_capacity), groups=int(lc.head_groups))
    overflow = jnp.maximum(overflow, over)
    contrib = jnp.sum(w * ce, axis=-1)  # [rows of the group]
    start = 0
    for (task, a), wt in zip(group, weights):
      stop = start + a["input_ids"].shape[0]
      nums[task] = jnp.sum(contrib[start:stop])
      aux[f"masked_tokens_{task}"] = jnp.sum(a["input_ids"] == int(config.vocab.mask_id)).astype(jnp.float32)
      aux[f"loss_tokens_{task}"] = jnp.sum(wt != 0).astype(jnp.float32)
      rows_out[task] = contrib[start:stop]
      start = stop
  aux["head_overflow"] = overflow.astype(jnp.float32)
  return (nums, aux, rows_out) if per_row else (nums, aux)


def loss_terms(params: Any, corrupted: Mapping[str, Mapping[str, Array]], *, model, config: Any) -> tuple[Terms, dict]:
  """`({task: (numerator, denominator)}, metrics)` for given (already corrupted) inputs — the fixed-mask entry point."""
  nums, aux = numerators(params, corrupted, model=model, config=config)
  dens = denominators(corrupted, config)
  terms = {t: (nums[t], dens[t]) for t in TASKS}
  metrics = dict(aux)
  metrics.update({f"loss_{t}": _safe_div(nums[t], dens[t]) for t in TASKS})
  return terms, metrics


def loss_fn(params: Any, batch: Mapping[str, Mapping[str, Array]], step_key: Array, *, model,
            config: Any) -> tuple[Terms, dict]:
  """Corrupts a clean mixed batch on device (`corruption.corrupt_batch`) and returns `loss_terms` of it.

  `batch` = `{"t2i": {...}, "lm": {...}, "mmu": {...}}` (absent or empty tasks allowed), each with int arrays
  `input_ids`, `labels`, `valid_mask`, `prompt_mask` `[rows, L]` and optionally `example_id` `[rows]`.
  """
  corrupted = corruption.corrupt_batch(batch, step_key, config)
  terms, metrics = loss_terms(params, corrupted, model=model, config=config)
  if "t2i" in corrupted and corrupted["t2i"]["mask_rate"].shape[0]:
    metrics["t2i_mask_rate"] = jnp.mean(corrupted["t2i"]["mask_rate"])
  return terms, metrics


def _safe_div(num: Array, den: Array) -> Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def combine(terms: Mapping[str, tuple[Array, Array]], config: Any) -> Array:
  """Σ_task coeff_task · numerator / denominator; a task with denominator 0 (no rows) contributes 0."""
  coeffs = coefficients(config)
  total = jnp.zeros((), jnp.float32)
  for task, (num, den) in terms.items():
    total = total + coeffs[task] * _safe_div(num, den)
  return total


class Objective:
  """The objective as the train step's hooks: `corrupt`, `denominators`, `numerators`, `coefficients`."""

  def __init__(self, config: Any, model):
    self.config, self.model = config, model
    self.coefficients = coefficients(config)

  def corrupt(self, batch, key: Array) -> dict:
    return corruption.corrupt_batch(batch, key, self.config)

  def denominators(self, corrupted) -> dict[str, Array]:
    return denominators(corrupted, self.config)

  def numerators(self, params: Any, corrupted) -> tuple[dict[str, Array], dict[str, Array]]:
    return numerators(params, corrupted, model=self.model, config=self.config)
