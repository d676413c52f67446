"""Masks of UniGRPO's inner iterations: which response tokens become [MASK] at ratio p (specs/unigrpo.md §6.3).

Every mask is a pure function of (rollout key, iteration n, mask index k, sample uid, p, eligible positions): the key of
row b is `fold_in(fold_in(mask_key, n·K + k), uid[b])` for K masks per iteration. The same masks therefore come out of
the old/reference precompute and of the train step, whatever the micro-batching, the batch order or the device count
(spec §7 items 1-2), and n may be a traced integer (no recompilation across iterations).

Sequence layout (spec §6.2): `tokens [B, P + C]` = left-padded prompt (P positions) ⊕ response (C positions). Response
positions are the static slice `[P:]`, so the prompt can never be masked by the response masks; only the d1 baseline
masks prompt tokens, from its own subkey and at real prompt positions only.

Mask laws:
  exact      exactly k = clip(round(p·n_valid), 1, n_valid) of the n_valid eligible positions, chosen uniformly (ranks
             of uniform noise); the recommended default (spec §2.7) — |M| is never 0 when n_valid > 0.
  bernoulli  each eligible position independently with probability p (d1, IGPO, dLLM-RL); |M| may be 0, such rows get
             weight 0 in the loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
LAWS = ("exact", "bernoulli")
TAILS = ("first_eos", "all")


def row_key(mask_key: Array, n: Array | int, k: Array | int, num_k: int, uid: Array) -> Array:
  """The key of one row's mask at iteration n, mask index k of num_k (n·num_k + k numbers the masks of a batch)."""
  return jax.random.fold_in(jax.random.fold_in(mask_key, n * num_k + k), uid)


def exact_count_mask(key: Array, p: Array, eligible: Array) -> Array:
  """`[C]` bool: exactly clip(round(p·n_valid), 1, n_valid) uniformly chosen eligible positions (none if n_valid=0)."""
  u = jax.random.uniform(key, eligible.shape, jnp.float32)
  u = jnp.where(eligible, u, jnp.inf)  # ineligible positions rank last
  n_valid = jnp.sum(eligible.astype(jnp.int32))
  k = jnp.clip(jnp.round(p * n_valid.astype(jnp.float32)).astype(jnp.int32), 1, jnp.maximum(n_valid, 1))
  k = jnp.where(n_valid > 0, k, 0)
  rank = jnp.argsort(jnp.argsort(u))
  return (rank < k) & eligible


def bernoulli_mask(key: Array, p: Array, eligible: Array) -> Array:
  """`[C]` bool: every eligible position masked independently with probability p."""
  return (jax.random.uniform(key, eligible.shape, jnp.float32) < p) & eligible


def row_masks(key: Array, p: Array, maskable: Array, prompt_valid: Array | None, *, law: str = "exact",
              prompt_mask_prob: float = 0.0) -> tuple[Array, Array | None]:
  """One row: (response mask `[C]` bool, prompt mask `[P]` bool or None).

  The prompt mask (d1 baseline only, `prompt_mask_prob > 0`) is Bernoulli over the real prompt positions
  (`prompt_valid`), drawn from fold_in(key, 1), independent of the response mask.
  """
  if law not in LAWS:
    raise ValueError(f"rl.mask_law must be one of {LAWS}, got {law!r}")
  fn = exact_count_mask if law == "exact" else bernoulli_mask
  resp = fn(key, p, maskable)
  if prompt_mask_prob <= 0 or prompt_valid is None:
    return resp, None
  u = jax.random.uniform(jax.random.fold_in(key, 1), prompt_valid.shape, jnp.float32)
  return resp, (u < prompt_mask_prob) & prompt_valid.astype(bool)


@functools.partial(jax.jit, static_argnames=("law", "prompt_mask_prob"))
def iteration_masks(mask_key: Array, n: Array | int, ratios: Array, sample_uid: Array, maskable: Array,
                    prompt_valid: Array | None = None, *, law: str = "exact",
                    prompt_mask_prob: float = 0.0) -> tuple[Array, Array | None]:
  """Masks of inner iteration n for K masks per row.

  Args:
    mask_key: the rollout batch's mask key; n: iteration index (int or traced int32).
    ratios: `[K, B]` mask ratios of iteration n; sample_uid: `[B]` int; maskable: `[B, C]` bool eligible positions.
    prompt_valid: `[B, P]` real prompt positions (needed only when prompt_mask_prob > 0).
  Returns:
    response masks `[K, B, C]` bool and prompt masks `[K, B, P]` bool (None when prompt_mask_prob == 0).
  """
  kk = ratios.shape[0]
  uid = jnp.asarray(sample_uid, jnp.int32)

  def one(k, p_row):
    keys = jax.vmap(lambda u: row_key(mask_key, n, k, kk, u))(uid)
    fn = lambda key, p, m, pv: row_masks(key, p, m, pv, law=law, prompt_mask_prob=prompt_mask_prob)
    pv = prompt_valid if prompt_valid is not None else jnp.ones((uid.shape[0], 1), bool)
    return jax.vmap(fn)(keys, p_row, maskable, pv)

  resp, prompt = jax.vmap(one)(jnp.arange(kk, dtype=jnp.int32), ratios)
  return resp, (prompt if prompt_mask_prob > 0 else None)


@functools.partial(jax.jit, static_argnames=("law", "prompt_mask_prob"))
def all_masks(mask_key: Array, ratios: Array, sample_uid: Array, maskable: Array, prompt_valid: Array | None = None, *,
              law: str = "exact", prompt_mask_prob: float = 0.0) -> tuple[Array, Array | None]:
  """Masks of every iteration: ratios `[μ, K, B]` → response masks `[μ, K, B, C]` (prompt masks `[μ, K, B, P]`)."""
  mu = ratios.shape[0]
  fn = lambda n, r: iteration_masks(mask_key, n, r, sample_uid, maskable, prompt_valid, law=law,
                                    prompt_mask_prob=prompt_mask_prob)
  return jax.vmap(fn)(jnp.arange(mu, dtype=jnp.int32), ratios)


def noisy_tokens(tokens: Array, resp_mask: Array, prompt_mask: Array | None, mask_id: int) -> Array:
  """`[..., P + C]` ids with [MASK] at the masked response (and, d1 only, prompt) positions.

  tokens `[B, P + C]`; resp_mask `[..., B, C]`; prompt_mask `[..., B, P]` or None (leading axes broadcast).
  """
  c = resp_mask.shape[-1]
  p = tokens.shape[-1] - c
  full = jnp.concatenate([jnp.zeros(resp_mask.shape[:-1] + (p,), bool) if prompt_mask is None else prompt_mask,
                          resp_mask], axis=-1)
  return jnp.where(full, jnp.asarray(mask_id, tokens.dtype), tokens)


@functools.partial(jax.jit, static_argnames=("terminators",))
def first_terminator(response: Array, terminators: tuple[int, ...]) -> Array:
  """`[B]` int32 index of the first terminator (EOS or end-of-turn id) of each response `[B, C]`; C when none."""
  hit = jnp.zeros(response.shape, bool)
  for t in terminators:
    hit = hit | (response == t)
  c = response.shape[-1]
  return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), c).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("terminators", "loss_tail", "mask_tail"))
def response_positions(response: Array, terminators: tuple[int, ...], *, loss_tail: str = "first_eos",
                       mask_tail: bool = True) -> tuple[Array, Array]:
  """(maskable `[B, C]`, loss-eligible `[B, C]`) positions of responses `[B, C]` (spec §2.7 "post-EOS padding").

  loss_tail "first_eos": the loss covers positions up to and including the first terminator (so the policy can learn
  length, spec §7 item 7), "all": every position. mask_tail: tail positions after the first terminator may be masked
  in the input (the SFT convention); False keeps them visible.
  """
  if loss_tail not in TAILS:
    raise ValueError(f"rl.loss_tail must be one of {TAILS}, got {loss_tail!r}")
  first = first_terminator(response, terminators)
  upto = jnp.arange(response.shape[-1])[None] <= first[:, None]
  everything = jnp.ones(response.shape, bool)
  return (everything if mask_tail else upto), (upto if loss_tail == "first_eos" else everything)
