"""Mask-ratio schedules of UniGRPO's inner iterations (specs/unigrpo.md §2.4, §6.3).

A rollout batch is optimised for μ inner iterations; iteration n (0-based here, n = 1..μ in the paper) masks each
response at ratio p[n, b]. All schedules return `[μ, B]` fp32 ratios in [0, 1], drawn from per-sample keys
`fold_in(key, sample_uid[b])`, so a row's ratios depend only on the key and its uid (never on its position in the batch,
the micro-batching or the sharding, spec §7 item 1).

Modes:
  algorithm1       the paper's Algorithm 1 (normative formula, §2.4): r ~ U(0, 1), t_1 = ⌊rT⌋,
                   t_n = ⌊(n − 1)/(μ − 1)·(T − t_1) + t_1⌋, p_n = t_n / T; so p_1 = ⌊rT⌋/T, evenly spaced, p_μ = 1.
                   (The paper's §5.2 worked example "100 → 300, 500, 700, 900" contradicts the formula; the formula
                   is followed, spec §7 item 14.)
  stratified_wrap  p_n = ((r + (n − 1)/μ) mod 1): each p_n marginally uniform, jointly stratified (LLaDA MC flavour).
  iid              p_n = ⌊u_n T⌋/T, u_n ~ U(0, 1) independently per iteration (the "fully random" ablation, Fig. 4).
  range            p_n ~ U[lo, hi] independently per iteration (dLLM-RL `random_masking`, U[0.1, 0.9]).
  d1               p_n = 1 (the d1 / diffu-GRPO one-step estimator; prompt masking is added by `masks.py`).

`shared=True` draws one r (or u_n) for the whole batch (IGPO's per-batch schedule); the default is one per response
(Eq. 5's {p_i}; spec §2.7). `p_min` clamps every ratio from below (spec §2.7, "clamp p ≥ 1/L_valid"; exact-count masks
already mask at least one token).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
MODES = ("algorithm1", "stratified_wrap", "iid", "range", "d1")


def algorithm1(r: Array, mu: int, T: int) -> Array:
  """Algorithm 1's ratios for start draws r `[...]` in [0, 1) → `[μ, ...]` fp32.

  The timesteps are integers computed in int32 / fp32 exactly as the formula's floors demand; with μ = 1 only p_1.
  """
  t1 = jnp.floor(jnp.asarray(r, jnp.float32) * T).astype(jnp.int32)
  t1 = jnp.clip(t1, 0, T - 1)  # r < 1, but guard fp32 rounding of r·T up to T
  if mu == 1:
    return (t1.astype(jnp.float32) / T)[None]
  n = jnp.arange(mu, dtype=jnp.int32).reshape((mu,) + (1,) * t1.ndim)  # n - 1 of the paper
  # ⌊(n−1)(T − t1)/(μ−1) + t1⌋ with integer arithmetic: (n−1)(T − t1) // (μ − 1) + t1 (exact; no fp rounding at n = μ).
  t = (n * (T - t1)[None]) // (mu - 1) + t1[None]
  return t.astype(jnp.float32) / T


def _row_draws(key: Array, sample_uid: Array, count: int, shared: bool) -> Array:
  """U(0, 1) draws `[count, B]`: per row from fold_in(key, uid), or one row of draws broadcast (shared)."""
  uid = jnp.asarray(sample_uid, jnp.int32)
  if shared:
    u = jax.random.uniform(key, (count,), jnp.float32)
    return jnp.broadcast_to(u[:, None], (count, uid.shape[0]))
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (count,), jnp.float32), out_axes=1)(uid)


@functools.partial(jax.jit, static_argnames=("mu", "mode", "T", "shared", "ratio_range", "p_min"))
def mask_ratios(key: Array, sample_uid: Array, mu: int, *, mode: str = "algorithm1", T: int = 1000,
                shared: bool = False, ratio_range: tuple[float, float] = (0.1, 0.9), p_min: float = 0.0) -> Array:
  """Mask ratios `[μ, B]` fp32 for one rollout batch (module docstring).

  Args:
    key: the schedule key of the rollout batch (e.g. fold_in(rollout_key, tag)).
    sample_uid: `[B]` int global ids of the responses (PRNG folding, layout independence).
    mu: inner iterations μ ≥ 1.
    mode: one of MODES.
    T: number of discrete timesteps quantising the ratio (paper: 1000) for algorithm1 / iid.
    shared: one draw for the whole batch instead of one per response.
    ratio_range: (lo, hi) of the "range" mode.
    p_min: lower clamp of every ratio.
  """
  if mode not in MODES:
    raise ValueError(f"rl.schedule must be one of {MODES}, got {mode!r}")
  if mu < 1:
    raise ValueError(f"rl.inner_steps (μ) must be >= 1, got {mu}")
  if T < 1:
    raise ValueError(f"rl.schedule_T must be >= 1, got {T}")
  b = jnp.asarray(sample_uid).shape[0]
  if mode == "d1":
    p = jnp.ones((mu, b), jnp.float32)
  elif mode == "algorithm1":
    p = algorithm1(_row_draws(key, sample_uid, 1, shared)[0], mu, T)
  elif mode == "stratified_wrap":
    r = _row_draws(key, sample_uid, 1, shared)[0]
    p = jnp.mod(r[None] + jnp.arange(mu, dtype=jnp.float32)[:, None] / mu, 1.0)
  elif mode == "iid":
    u = _row_draws(key, sample_uid, mu, shared)
    p = jnp.clip(jnp.floor(u * T), 0, T - 1) / T
  else:
    lo, hi = (float(x) for x in ratio_range)
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"rl.ratio_range must satisfy 0 <= lo <= hi <= 1, got {ratio_range}")
    p = lo + (hi - lo) * _row_draws(key, sample_uid, mu, shared)
  return jnp.maximum(p, jnp.float32(p_min)).astype(jnp.float32)


def multi_mask_ratios(key: Array, sample_uid: Array, mu: int, k: int, **kwargs) -> Array:
  """`[μ, K, B]` ratios for K masks per inner iteration (the variance-reduced variant, spec §6.4 (b)): mask k of every
  iteration follows its own, independently drawn schedule (key folded with k). K = 1 gives the paper's schedule."""
  if k < 1:
    raise ValueError(f"rl.masks_per_step (K) must be >= 1, got {k}")
  per_k = [mask_ratios(jax.random.fold_in(key, j) if k > 1 else key, sample_uid, mu, **kwargs) for j in range(k)]
  return jnp.stack(per_k, axis=1)
