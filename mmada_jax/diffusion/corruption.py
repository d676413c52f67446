"""On-device corruption of a clean training batch (DESIGN.md Decision 6; specs/mmada-official.md §4.1-§4.2).

Every random draw comes from a per-example key `fold_in(fold_in(step_key, task_index), example_id)`, so the mask of an
example depends only on the step key, its task and its id — never on its row, the batch size, the sharding or the
number of micro-batches. All functions are pure and jittable; the per-row ones (`mask_text`, `mask_image`) take one
sequence `[length]` and are vmapped over rows by `corrupt_batch`.

Text (LLaDA, §4.2): per row t ~ U(0, 1), p = (1 - eps) t + eps, every eligible position masked independently with
probability p (`u < p`). Answer-only rows (chat/CoT `lm`, `mmu`) restore the prompt (`prompt_mask == 1`), so only the
answer — its EOS padding included — is ever masked. Plain pre-training text has no prompt positions.

Images (Show-o/MMaDA `mask_or_random_replace_tokens`, §4.1): per row t ~ U(0, 1), r = schedule(t) (cosine: cos(pi t/2)),
r = max(r, min_rate), n = max(round(N r), 1) with N the number of image positions of the row; exactly n of them, chosen
uniformly (ranks of uniform noise), become [MASK]. Labels keep the image id at masked positions and get -100 at the
others; the `<soi>`/`<eoi>` labels and the text prefix are left as the layout built them (§3.1).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
IGNORE_ID = -100  # official ignore_id
TASKS = ("t2i", "lm", "mmu")  # batch order of the official step (t2i rows, then lm, then mmu)
IMAGE_SCHEDULES = ("cosine", "linear")


def example_keys(step_key: Array, task: str, example_id: Array) -> Array:
  """Per-example keys `[batch]` for one task: fold_in(fold_in(step_key, task index), example_id[b]).

  Folding the task in first keeps example 0 of t2i and example 0 of lm independent.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
  task_key = jax.random.fold_in(step_key, TASKS.index(task))
  return jax.vmap(lambda i: jax.random.fold_in(task_key, i))(jnp.asarray(example_id, jnp.int32))


def row_uniforms(key: Array, length: int) -> tuple[Array, Array]:
  """The row's time t (scalar) and one uniform per position `[length]`, all U(0, 1) fp32, from one draw of the key."""
  u = jax.random.uniform(key, (length + 1,), jnp.float32)
  return u[0], u[1:]


# ----------------------------------------------------------------------------------------------------------------------
# Text


def mask_text(key: Array, ids: Array, prompt_mask: Array | None, *, mask_id: int, eps: float,
              answer_only: bool = True) -> tuple[Array, Array, Array]:
  """LLaDA corruption of one sequence.

  Args:
    key: the example's key.
    ids: `[length]` clean token ids.
    prompt_mask: `[length]` 1 = prompt (never masked when `answer_only`), or None (nothing is prompt).
    mask_id: the [MASK] id.
    eps: floor of the masking probability (official 1e-3).
    answer_only: restore prompt positions (chat/CoT lm and mmu rows).

  Returns:
    noisy ids `[length]`, masked `[length]` bool, p (scalar fp32, the masking probability of the row).
  """
  t, u = row_uniforms(key, ids.shape[0])
  p = (1.0 - eps) * t + eps
  masked = u < p
  if answer_only and prompt_mask is not None:
    masked = masked & (prompt_mask == 0)
  return jnp.where(masked, jnp.asarray(mask_id, ids.dtype), ids), masked, p


def answer_lengths(prompt_mask: Array) -> Array:
  """Answer length per row `[batch]` fp32: Σ(1 - prompt_mask), at least 1 (official SFT/mmu normaliser, §4.3)."""
  return jnp.maximum(jnp.sum(1 - prompt_mask.astype(jnp.int32), axis=-1), 1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Images


def image_mask_rate(t: Array, schedule: str = "cosine", min_rate: float = 0.0) -> Array:
  """Fraction of image tokens to mask for times t in [0, 1): cosine cos(pi t / 2) (official) or linear 1 - t,
  clipped below at `min_rate` (official `min_masking_rate`)."""
  t = jnp.asarray(t, jnp.float32)
  if schedule == "cosine":
    r = jnp.cos(t * (np.pi * 0.5))
  elif schedule == "linear":
    r = 1.0 - t
  else:
    raise ValueError(f"image schedule must be one of {IMAGE_SCHEDULES}, got {schedule!r}")
  return jnp.maximum(r, min_rate)


def mask_image(key: Array, ids: Array, labels: Array, eligible: Array, *, mask_id: int, schedule: str = "cosine",
               min_rate: float = 0.0) -> tuple[Array, Array, Array, Array]:
  """Show-o/MMaDA image corruption of one t2i sequence: exactly n = max(round(N r), 1) image positions masked.

  Args:
    key: the example's key.
    ids: `[length]` clean ids (image positions hold image ids).
    labels: `[length]` clean labels (image positions hold the image ids).
    eligible: `[length]` bool, the image positions (N = eligible.sum(), the official `seq_len` of the image tokens).
    mask_id, schedule, min_rate: see `image_mask_rate`.

  Returns:
    noisy ids `[length]`, labels `[length]` (image id where masked, -100 at unmasked image positions, unchanged
    elsewhere), masked `[length]` bool, n (int32 scalar, the number of masked positions; 0 only if N = 0).
  """
  t, u = row_uniforms(key, ids.shape[0])
  rate = image_mask_rate(t, schedule, min_rate)
  num_image = jnp.sum(eligible.astype(jnp.int32))
  n = jnp.maximum(jnp.round(num_image.astype(jnp.float32) * rate), 1.0).astype(jnp.int32)
  n = jnp.minimum(n, num_image)
  # A uniform subset of exactly n positions: rank the image positions by uniform noise (non-image positions get noise
  # 2 > any draw, so they rank last) and keep the n smallest ranks — the official argsort of uniform noise.
  noise = jnp.where(eligible, u, 2.0)
  rank = jnp.argsort(jnp.argsort(noise))
  masked = (rank < n) & eligible
  noisy = jnp.where(masked, jnp.asarray(mask_id, ids.dtype), ids)
  new_labels = jnp.where(eligible & ~masked, jnp.asarray(IGNORE_ID, labels.dtype), labels)
  return noisy, new_labels, masked, n


# ----------------------------------------------------------------------------------------------------------------------
# Whole batches


def _row_ids(arrays: Mapping[str, Array]) -> Array:
  rows = arrays["input_ids"].shape[0]
  if "example_id" in arrays:
    return jnp.asarray(arrays["example_id"], jnp.int32)
  return jnp.arange(rows, dtype=jnp.int32)


def _require(arrays: Mapping[str, Array], task: str, keys: tuple[str, ...]) -> None:
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise KeyError(f"batch[{task!r}] lacks {missing} (has {sorted(arrays)})")
  shape = arrays["input_ids"].shape
  if len(shape) != 2:
    raise ValueError(f"batch[{task!r}]['input_ids'] must be [batch, length], got shape {shape}")
  for k in keys:
    if arrays[k].shape != shape:
      raise ValueError(f"batch[{task!r}][{k!r}] has shape {arrays[k].shape}, expected {shape} like input_ids")


def corrupt_t2i(arrays: Mapping[str, Array], step_key: Array, *, mask_id: int, schedule: str,
                min_rate: float) -> dict[str, Array]:
  """Corrupts t2i rows. Needs `input_ids`, `labels`, `valid_mask`, `prompt_mask` `[batch, length]` (image positions =
  `prompt_mask == 0`), optional `example_id` `[batch]`. Returns `input_ids` (noisy), `labels`, `valid_mask`, `masked`
  `[batch, length]`, `example_id` and `mask_rate` (n / N) `[batch]`."""
  _require(arrays, "t2i", ("input_ids", "labels", "valid_mask", "prompt_mask"))
  eid = _row_ids(arrays)
  eligible = arrays["prompt_mask"] == 0
  fn = lambda k, i, l, e: mask_image(k, i, l, e, mask_id=mask_id, schedule=schedule, min_rate=min_rate)
  noisy, labels, masked, n = jax.vmap(fn)(example_keys(step_key, "t2i", eid), arrays["input_ids"], arrays["labels"],
                                          eligible)
  num_image = jnp.maximum(jnp.sum(eligible, axis=-1), 1).astype(jnp.float32)
  return dict(input_ids=noisy, labels=labels, valid_mask=arrays["valid_mask"], masked=masked, example_id=eid,
              mask_rate=n.astype(jnp.float32) / num_image)


def corrupt_text(arrays: Mapping[str, Array], step_key: Array, task: str, *, mask_id: int, eps: float,
                 answer_only: bool) -> dict[str, Array]:
  """Corrupts lm or mmu rows. Needs `input_ids`, `labels`, `valid_mask`, `prompt_mask` `[batch, length]`, optional
  `example_id` `[batch]`. Returns `input_ids` (noisy), `labels`, `valid_mask`, `masked` `[batch, length]`, and
  `example_id`, `p_mask` (masking probability), `answer_len` (Σ(1 - prompt_mask), >= 1) `[batch]`."""
  _require(arrays, task, ("input_ids", "labels", "valid_mask", "prompt_mask"))
  eid = _row_ids(arrays)
  fn = lambda k, i, pm: mask_text(k, i, pm, mask_id=mask_id, eps=eps, answer_only=answer_only)
  noisy, masked, p = jax.vmap(fn)(example_keys(step_key, task, eid), arrays["input_ids"], arrays["prompt_mask"])
  return dict(input_ids=noisy, labels=arrays["labels"], valid_mask=arrays["valid_mask"], masked=masked,
              example_id=eid, p_mask=p, answer_len=answer_lengths(arrays["prompt_mask"]))


def corrupt_batch(batch: Mapping[str, Mapping[str, Array]], step_key: Array,
                  config: Any) -> dict[str, dict[str, Array]]:
  """Corrupts a mixed batch `{"t2i": {...}, "lm": {...}, "mmu": {...}}` (absent tasks stay absent).

  Uses `config.vocab.mask_id` and `config.loss` (`text_eps`, `lm_answer_only`, `image_schedule`,
  `image_min_mask_rate`). mmu rows are always answer-only (official). Every output array has the task's rows as its
  leading axis, so the result can be split into micro-batches row-wise.
  """
  unknown = sorted(set(batch) - set(TASKS))
  if unknown:
    raise KeyError(f"batch has unknown tasks {unknown}, expected a subset of {TASKS}")
  lc, mask_id = config.loss, int(config.vocab.mask_id)
  out = {}
  if "t2i" in batch:
    out["t2i"] = corrupt_t2i(batch["t2i"], step_key, mask_id=mask_id, schedule=str(lc.image_schedule),
                             min_rate=float(lc.image_min_mask_rate))
  for task in ("lm", "mmu"):
    if task in batch:
      answer_only = bool(lc.lm_answer_only) if task == "lm" else True
      out[task] = corrupt_text(batch[task], step_key, task, mask_id=mask_id, eps=float(lc.text_eps),
                               answer_only=answer_only)
  return out
