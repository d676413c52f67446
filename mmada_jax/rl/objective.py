"""The UniGRPO objective: masked-token log-probabilities, group advantages, the clipped surrogate with a k3 KL.

Log-probabilities (spec §2.5, §6.4): for a response mask M, one forward pass over the noisy sequence q ⊕ õ gives
ℓ_t = log softmax(f(q ⊕ õ))_t[o_t] at every masked response position. The LM head is evaluated only at the positions
that enter the loss, with `losses.token_ce` (gathered or chunked head, never fp32 logits for the whole batch). A
`vocab_slice` (a, b) normalises over ids [a, b) only — the image codebook for text-to-image (spec §6.4, MaskGRPO).

Several masks of the same rows (the μ iterations of the precompute, the K masks of a step) are evaluated by
`multi_mask_logp` in one of three equivalent ways (`rl.logp_mode`, tested equal):
  fold  the K copies are folded batch-major into K·B rows and the backbone runs once (what vmap would compute, with the
        copies of a row kept on the row's device, so a batch-sharded input needs no communication); the default.
  vmap  `jax.vmap` of the single-mask function over K (the gathered head's `lax.cond` becomes a select under vmap,
        i.e. both head paths run: prefer fold or head="chunked").
  map   `lax.map` over K: one copy at a time (least activation memory).

Per-token terms (spec §2.6, §6.4): with Δ = ℓ_θ − ℓ_old (optionally clamped), r = exp(Δ), A the row's advantage,
  f = min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) − β·k3,   k3 = exp(ℓ_ref − ℓ_θ) − (ℓ_ref − ℓ_θ) − 1 ≥ 0,
on loss positions lm = M ∧ loss-eligible. Aggregation over the whole (global) batch, all K masks alike:
  sample  (paper App. A.2, default) loss = −Σ_rows w·(Σ_t f·lm / n_row) / Σ_rows w, n_row = |M ∧ eligible|
          (`seq_normaliser="masked"`, spec default) or the row's eligible length |o_i| ("response", the literal 1/|o_i|
          reading of Eq. 5); w = row_weight·[Σ_t lm > 0].
  token   (d1 / IGPO) loss = −Σ f·lm·row_weight / Σ lm·row_weight.
Numerators are sums over rows and the denominators depend on the masks only, so micro-batches add numerators and divide
once by the whole batch's denominator (as the SFT step does).

Advantages (Eq. 15, spec §2.3): Â_i = (r_i − mean_G r)/std_G r with the population std and Â = 0 where std < eps;
`std=False` gives the d1 / IGPO mean-only form. Groups whose rewards are all equal are counted (`zero_std`); with
`filter_zero_std` their rows get row_weight 0 (shapes stay static, so this saves no compute).

The d1 / diffu-GRPO baseline estimator is this objective with schedule "d1" (every response token masked), prompt
tokens masked with probability 0.15 (`masks.row_masks`), token-level aggregation and mean-only advantages
(`experiments/toyworld_rl.py:text_d1`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.diffusion import losses
from mmada_jax.models import llada
from mmada_jax.rl import masks as masks_lib

Array = jax.Array
LOGP_MODES = ("fold", "vmap", "map")
NORMALISATIONS = ("sample", "token")
SEQ_NORMALISERS = ("masked", "response")


@dataclasses.dataclass(frozen=True)
class LogpSettings:
  """How masked-token log-probabilities are evaluated (hashable, static under jit)."""
  mask_id: int
  head: str = "gather"
  head_chunk: int = 128
  head_capacity: float = 0.6
  head_groups: int = 0
  vocab_slice: tuple[int, int] | None = None
  mode: str = "fold"

  def __post_init__(self):
    if self.mode not in LOGP_MODES:
      raise ValueError(f"rl.logp_mode must be one of {LOGP_MODES}, got {self.mode!r}")
    if self.head not in losses.HEAD_STRATEGIES:
      raise ValueError(f"loss.head must be one of {losses.HEAD_STRATEGIES}, got {self.head!r}")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The clipped surrogate and its aggregation (hashable)."""
  clip_low: float = 0.2
  clip_high: float = 0.2
  beta: float = 0.04
  normalisation: str = "sample"
  seq_normaliser: str = "masked"
  logratio_clamp: float = 0.0  # > 0: Δ clipped to [−c, c] before exp (dLLM-RL value variant uses 10)

  def __post_init__(self):
    if self.normalisation not in NORMALISATIONS:
      raise ValueError(f"rl.normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
    if self.seq_normaliser not in SEQ_NORMALISERS:
      raise ValueError(f"rl.seq_normaliser must be one of {SEQ_NORMALISERS}, got {self.seq_normaliser!r}")
    if not (0 <= self.clip_low < 1 and self.clip_high >= 0 and self.beta >= 0):
      raise ValueError(f"need 0 <= clip_low < 1, clip_high >= 0, beta >= 0; got {self.clip_low}, {self.clip_high}, "
                       f"{self.beta}")


# ----------------------------------------------------------------------------------------------------------------------
# Log-probabilities


def logp_of_noisy(params: Any, model, noisy: Array, attn: Array | None, labels: Array, want: Array,
                  s: LogpSettings) -> Array:
  """Log-probabilities `[R, C]` fp32 of `labels` at the `want` positions of the last C positions (0 elsewhere).

  noisy `[R, P + C]` int ids (masks applied); attn `[R, P + C]` padding mask or None; labels / want `[R, C]`.
  """
  c = labels.shape[-1]
  h = model.apply({"params": params}, noisy, attn, output="hidden")[:, -c:]
  kernel = llada.head_kernel(params)
  if s.vocab_slice is not None:
    a, b = s.vocab_slice
    kernel, labels = kernel[:, a:b], labels - a
  ce, _ = losses.token_ce(kernel, h, labels, want, model.args, head=s.head, chunk=s.head_chunk,
                          capacity=s.head_capacity, groups=s.head_groups)
  return -ce


def token_logp(params: Any, model, tokens: Array, attn: Array | None, resp_mask: Array, prompt_mask: Array | None,
               want: Array, s: LogpSettings) -> Array:
  """One mask: tokens `[B, P + C]`, resp_mask / want `[B, C]` bool, prompt_mask `[B, P]` or None → `[B, C]` log-probs
  (at `want` positions, which should lie inside resp_mask)."""
  c = resp_mask.shape[-1]
  noisy = masks_lib.noisy_tokens(tokens, resp_mask, prompt_mask, s.mask_id)
  return logp_of_noisy(params, model, noisy, attn, tokens[:, -c:], want, s)


def multi_mask_logp(params: Any, model, tokens: Array, attn: Array | None, resp_masks: Array,
                    prompt_masks: Array | None, want: Array, s: LogpSettings) -> Array:
  """K masks of the same rows: resp_masks / want `[K, B, C]`, prompt_masks `[K, B, P]` or None → `[K, B, C]`."""
  k, b, c = resp_masks.shape
  if s.mode == "vmap":
    fn = lambda rm, pm, w: token_logp(params, model, tokens, attn, rm, pm, w, s)
    return jax.vmap(fn, in_axes=(0, None if prompt_masks is None else 0, 0))(resp_masks, prompt_masks, want)
  if s.mode == "map":
    fn = lambda xs: token_logp(params, model, tokens, attn, xs[0], xs[1] if prompt_masks is not None else None,
                               xs[-1], s)
    xs = (resp_masks, prompt_masks, want) if prompt_masks is not None else (resp_masks, want)
    return jax.lax.map(fn, xs)
  noisy = masks_lib.noisy_tokens(tokens, resp_masks, prompt_masks, s.mask_id)  # [K, B, L]
  fold = lambda x: jnp.swapaxes(x, 0, 1).reshape((b * k,) + x.shape[2:])  # batch-major: row b's copies together
  rep = lambda x: jnp.repeat(x, k, axis=0)
  out = logp_of_noisy(params, model, fold(noisy), None if attn is None else rep(attn), rep(tokens[:, -c:]),
                      fold(want), s)
  return jnp.swapaxes(out.reshape(b, k, c), 0, 1)


def precompute_logps(params_old: Any, params_ref: Any | None, model, tokens: Array, attn: Array | None,
                     resp_masks: Array, prompt_masks: Array | None, want: Array, s: LogpSettings):
  """Old and reference log-probabilities for every mask of a rollout batch, without gradients.

  resp_masks / want `[μ, K, B, C]`, prompt_masks `[μ, K, B, P]` or None → (old `[μ, K, B, C]`, ref or None).
  The μ·K masks are evaluated together (`multi_mask_logp`); params_ref None skips the reference (β = 0).
  """
  mu, k = resp_masks.shape[:2]
  flat = lambda x: None if x is None else x.reshape((mu * k,) + x.shape[2:])
  unflat = lambda x: x.reshape((mu, k) + x.shape[1:])
  run = lambda p: unflat(jax.lax.stop_gradient(multi_mask_logp(p, model, tokens, attn, flat(resp_masks),
                                                                flat(prompt_masks), flat(want), s)))
  return run(params_old), (None if params_ref is None else run(params_ref))


def sequence_logp(logp: Array, lm: Array) -> Array:
  """Eq. 4: the masked-token mean log-probability per row, `[..., B]` (0 for rows without loss positions)."""
  n = jnp.sum(lm, axis=-1)
  return jnp.sum(jnp.where(lm, logp, 0.0), axis=-1) / jnp.maximum(n, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: np.ndarray, group_size: int, *, std: bool = True, eps: float = 1e-6,
                     filter_zero_std: bool = False) -> dict[str, np.ndarray]:
  """Group-normalised advantages of rewards `[B]` (rows group-major: rows g·G .. g·G + G − 1 share a prompt).

  Returns `adv` `[B]` fp32, `zero_std` `[B / G]` bool (all rewards of the group equal within eps) and `row_weight`
  `[B]` fp32 (0 for rows of zero-std groups when `filter_zero_std`, else 1).
  """
  r = np.asarray(rewards, np.float64)
  if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards must be [B] with B a multiple of rl.group_size={group_size}, got shape {r.shape}")
  g = r.reshape(-1, group_size)
  centred = g - g.mean(axis=1, keepdims=True)
  sd = g.std(axis=1, keepdims=True)  # population std (ddof 0), as dLLM-RL (spec §2.3)
  zero = sd[:, 0] < eps
  adv = np.where(sd < eps, 0.0, centred / np.where(sd < eps, 1.0, sd)) if std else centred
  weight = np.ones_like(g)
  if filter_zero_std:
    weight[zero] = 0.0
  return dict(adv=adv.reshape(-1).astype(np.float32), zero_std=zero, row_weight=weight.reshape(-1).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Surrogate, KL and aggregation


def token_terms(logp: Array, old: Array, ref: Array | None, adv: Array, s: LossSettings) -> dict[str, Array]:
  """Per-token quantities for logp / old / ref `[..., B, C]` and adv `[B]`: f (the objective, to maximise), ratio, k3,
  clipped_low / clipped_high (the clip is active: r < 1 − ε_low with A < 0, r > 1 + ε_high with A > 0)."""
  delta = logp - old
  if s.logratio_clamp > 0:
    delta = jnp.clip(delta, -s.logratio_clamp, s.logratio_clamp)
  ratio = jnp.exp(delta)
  a = jnp.asarray(adv, jnp.float32)[..., :, None]
  surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high) * a)
  if ref is None or s.beta == 0:
    k3 = jnp.zeros_like(logp)
  else:
    d = ref - logp
    k3 = jnp.exp(d) - d - 1.0
  return dict(f=surrogate - s.beta * k3, ratio=ratio, k3=k3, clipped_low=(ratio < 1.0 - s.clip_low) & (a < 0),
              clipped_high=(ratio > 1.0 + s.clip_high) & (a > 0))


def row_normaliser(lm: Array, eligible: Array, s: LossSettings) -> Array:
  """`[..., B]` per-row divisor of the sample-level form: |M ∧ eligible| or |eligible| (at least 1)."""
  n = jnp.sum(lm if s.seq_normaliser == "masked" else eligible, axis=-1)
  return jnp.maximum(n, 1).astype(jnp.float32)


def loss_denominator(lm: Array, row_weight: Array, s: LossSettings) -> Array:
  """The global denominator (fp32 scalar, ≥ 1e-9) for lm `[..., B, C]`: Σ rows w (sample) or Σ lm·row_weight (token)."""
  w = jnp.asarray(row_weight, jnp.float32)
  if s.normalisation == "sample":
    den = jnp.sum((jnp.sum(lm, axis=-1) > 0) * w)
  else:
    den = jnp.sum(jnp.sum(lm, axis=-1) * w)
  return jnp.maximum(den.astype(jnp.float32), 1e-9)


def loss_numerator(f: Array, lm: Array, eligible: Array, row_weight: Array, s: LossSettings) -> Array:
  """The objective's numerator (fp32 scalar, to maximise), additive over rows and masks; f / lm / eligible
  `[..., B, C]`, row_weight `[B]`. loss = −numerator / loss_denominator(whole batch)."""
  w = jnp.asarray(row_weight, jnp.float32)
  per_row = jnp.sum(jnp.where(lm, f, 0.0), axis=-1)
  if s.normalisation == "sample":
    per_row = per_row / row_normaliser(lm, eligible, s)
  return jnp.sum(per_row * w)


def metric_sums(terms: dict[str, Array], lm: Array, row_weight: Array) -> dict[str, Array]:
  """Additive metric sums over loss positions of rows with weight > 0 (divide by `tokens` at the end)."""
  m = lm & (jnp.asarray(row_weight)[:, None] > 0)
  s = lambda x: jnp.sum(jnp.where(m, x, 0.0)).astype(jnp.float32)
  return dict(tokens=jnp.sum(m).astype(jnp.float32), ratio=s(terms["ratio"]), kl=s(terms["k3"]),
              clip_low=s(terms["clipped_low"].astype(jnp.float32)),
              clip_high=s(terms["clipped_high"].astype(jnp.float32)),
              ratio_max=jnp.max(jnp.where(m, terms["ratio"], 0.0)),
              ratio_min=jnp.min(jnp.where(m, terms["ratio"], jnp.inf)))
