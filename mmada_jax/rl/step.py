"""UniGRPO's jitted device functions: the old/reference precompute and the policy step (specs/unigrpo.md §6.1).

Per rollout batch the host builds an `RLBatch` dict (rows = B = prompts × G, group-major):
  tokens      int32 [B, P + C]   left-padded prompt ⊕ response
  attn        int32 [B, P + C]   1 = real token (prompt padding 0); the same padding mask the sampler used (spec §7.6)
  maskable    bool  [B, C]       response positions that may be masked
  eligible    bool  [B, C]       response positions that may enter the loss (≤ first EOS by default)
  adv         f32   [B]          group-normalised advantages
  row_weight  f32   [B]          0 drops a row from the loss (zero-std filtering)
  uid         int32 [B]          global sample ids (PRNG folding)
  ratios      f32   [μ, K, B]    mask ratios of every iteration and mask
  mask_key    uint32 [2]         raw key data of the rollout batch's mask key
and `precompute` adds `old` (and `ref` when β > 0), f32 [μ, K, B, C].

`policy_step(state, batch, n)` takes the iteration index n as a traced int32 (one compiled program for every n),
rebuilds the masks of iteration n from the keys (identical to the precompute's), evaluates the K masks in one pass
(`objective.multi_mask_logp`), averages the objective over them, and takes one optimiser step. Gradient accumulation
(`rl.micro_batches`) is a `lax.scan` over row slices with denominators of the whole batch, so 4 × ¼-batch = 1 batch.
The reference parameters appear only in the precompute; they are frozen, sharded like the policy and never donated.

At iteration 0 the policy equals θ_old, so every ratio is 1 up to fp32 round-off between the precompute program and the
gradient program (measured |r − 1| ≤ 1e-6 on CPU, tests/test_rl_step.py); the old log-probabilities are deliberately not
replaced by the step's own, so that a mask or attention mismatch would show up in `ratio_min` / `ratio_max`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mmada_jax.rl import masks as masks_lib, objective as obj
from mmada_jax.train import optim
from mmada_jax.train.state import TrainState
from mmada_jax.train.step import keep_if_finite, sharding_constraint

Array = jax.Array
ROW_KEYS = ("tokens", "attn", "maskable", "eligible", "adv", "row_weight", "uid")  # batch axis 0
STACKED_KEYS = ("ratios", "old", "ref")  # [μ, K, B, ...]: batch axis 2


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the RL device functions (hashable)."""
  logp: obj.LogpSettings
  loss: obj.LossSettings
  mask_law: str = "exact"
  prompt_mask_prob: float = 0.0  # d1 baseline: prompt tokens masked with this probability
  micro_batches: int = 1

  @classmethod
  def from_config(cls, config, vocab_slice: tuple[int, int] | None = None) -> "StepSettings":
    rl, lc = config.rl, config.loss
    logp = obj.LogpSettings(mask_id=int(config.vocab.mask_id), head=str(lc.head), head_chunk=int(lc.head_chunk),
                            head_capacity=float(lc.head_capacity), head_groups=int(lc.head_groups),
                            vocab_slice=vocab_slice, mode=str(rl.logp_mode))
    loss = obj.LossSettings(clip_low=float(rl.clip_low), clip_high=float(rl.clip_high), beta=float(rl.kl_beta),
                            normalisation=str(rl.normalisation), seq_normaliser=str(rl.seq_normaliser),
                            logratio_clamp=float(rl.logratio_clamp))
    d1 = rl.estimator == "d1"
    return cls(logp=logp, loss=loss, mask_law=str(rl.mask_law),
               prompt_mask_prob=float(rl.d1_prompt_mask_prob) if d1 else 0.0, micro_batches=int(rl.micro_batches))


def _key(batch) -> Array:
  return jax.random.wrap_key_data(batch["mask_key"])


def _prompt_valid(batch, c: int) -> Array:
  return batch["attn"][:, :-c].astype(bool)


def masks_of(batch, n, s: StepSettings, ratios_n: Array | None = None) -> tuple[Array, Array | None]:
  """Response masks `[K, B, C]` (and d1 prompt masks `[K, B, P]`) of iteration n (traced or static)."""
  c = batch["maskable"].shape[-1]
  r = batch["ratios"][n] if ratios_n is None else ratios_n
  return masks_lib.iteration_masks(_key(batch), n, r, batch["uid"], batch["maskable"], _prompt_valid(batch, c),
                                   law=s.mask_law, prompt_mask_prob=s.prompt_mask_prob)


def make_precompute(model, s: StepSettings) -> Callable:
  """`(params, ref_params or None, batch) -> {"old": [μ, K, B, C], "ref": ... (absent when ref_params is None)}`."""

  def precompute(params, ref_params, batch):
    c = batch["maskable"].shape[-1]
    resp, prompt = masks_lib.all_masks(_key(batch), batch["ratios"], batch["uid"], batch["maskable"],
                                       _prompt_valid(batch, c), law=s.mask_law, prompt_mask_prob=s.prompt_mask_prob)
    want = resp & batch["eligible"][None, None]
    old, ref = obj.precompute_logps(params, ref_params, model, batch["tokens"], batch["attn"], resp, prompt, want,
                                    s.logp)
    return {"old": old} if ref is None else {"old": old, "ref": ref}

  return precompute


def _split_rows(tree: dict, m: int) -> dict:
  """Row-split into m consecutive micro-batches: leading axis m on every array (batch axis 0 or 1 for [K, B, ...])."""
  out = {}
  for name, x in tree.items():
    axis = 1 if name in ("resp", "prompt", "lm", "old", "ref") else 0
    b = x.shape[axis]
    x = x.reshape(x.shape[:axis] + (m, b // m) + x.shape[axis + 1:])
    out[name] = jnp.moveaxis(x, axis, 0)
  return out


def _micro_objective(model, s: StepSettings, den: Array) -> Callable:
  def micro_loss(params, mb):
    logp = obj.multi_mask_logp(params, model, mb["tokens"], mb["attn"], mb["resp"], mb.get("prompt"), mb["lm"],
                               s.logp)
    terms = obj.token_terms(logp, mb["old"], mb.get("ref"), mb["adv"], s.loss)
    num = obj.loss_numerator(terms["f"], mb["lm"], mb["eligible"][None], mb["row_weight"], s.loss)
    sums = obj.metric_sums(terms, mb["lm"], mb["row_weight"])
    return -num / den, sums

  return jax.value_and_grad(micro_loss, has_aux=True)


def _accumulate(grad_fn, params, micro: dict, m: int, constrain: Callable = lambda t: t):
  """(loss, metric sums, grads) over m micro-batches (scan) or the whole batch (m = 1); `constrain` pins the gradient
  accumulators to the parameters' sharding."""
  if m == 1:
    (loss, sums), grads = grad_fn(params, micro)
    return loss, sums, grads
  split = _split_rows(micro, m)

  def body(carry, mb):
    g_acc, l_acc, s_acc = carry
    (l, s), g = grad_fn(params, mb)
    g = constrain(g)
    add = lambda x, y: jax.tree.map(jnp.add, x, y)
    s_new = {k: (jnp.maximum if k == "ratio_max" else jnp.minimum if k == "ratio_min" else jnp.add)(s_acc[k], v)
             for k, v in s.items()}
    return (add(g_acc, g), l_acc + l, s_new), None

  first = jax.tree.map(lambda x: x[0], split)
  s0 = jax.eval_shape(lambda: grad_fn(params, first)[0][1])
  init_s = {k: jnp.full(v.shape, -jnp.inf if k == "ratio_max" else jnp.inf if k == "ratio_min" else 0.0, v.dtype)
            for k, v in s0.items()}
  init = (constrain(jax.tree.map(jnp.zeros_like, params)), jnp.zeros((), jnp.float32), init_s)
  (grads, loss, sums), _ = jax.lax.scan(body, init, split)
  return loss, sums, grads


def make_policy_step(model, tx: optax.GradientTransformation, s: StepSettings,
                     lr_schedule: Callable | None = None, param_shardings: Any | None = None) -> Callable:
  """The pure step `(state, batch, n) -> (state, metrics)` (jit it with `jit_policy_step`).

  As the train step (train/step.py): a non-finite loss or gradient norm keeps the old parameters and optimiser state
  (`finite` = 0, `skipped` = 1; `state.step` still advances), and `param_shardings` pins the gradient accumulators.
  """
  constrain = sharding_constraint(param_shardings)

  def policy_step(state: TrainState, batch, n):
    n = jnp.asarray(n, jnp.int32)
    resp, prompt = masks_of(batch, n, s)
    lm = resp & batch["eligible"][None]
    den = obj.loss_denominator(lm, batch["row_weight"], s.loss)
    micro = {k: batch[k] for k in ("tokens", "attn", "eligible", "adv", "row_weight")}
    micro.update(resp=resp, lm=lm, old=batch["old"][n])
    if prompt is not None:
      micro["prompt"] = prompt
    if "ref" in batch and s.loss.beta > 0:
      micro["ref"] = batch["ref"][n]
    loss, sums, grads = _accumulate(_micro_objective(model, s, den), state.params, micro, s.micro_batches, constrain)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = keep_if_finite(finite, (params, opt_state), (state.params, state.opt_state))
    tokens = jnp.maximum(sums["tokens"], 1.0)
    n_maskable = jnp.maximum(jnp.sum(batch["maskable"], axis=-1), 1)[None]
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite * 1.0, "skipped": 1.0 - finite,
               "ratio_mean": sums["ratio"] / tokens, "ratio_max": sums["ratio_max"], "ratio_min": sums["ratio_min"],
               "clip_frac_low": sums["clip_low"] / tokens, "clip_frac_high": sums["clip_high"] / tokens,
               "clip_frac": (sums["clip_low"] + sums["clip_high"]) / tokens, "kl": sums["kl"] / tokens,
               "loss_tokens": sums["tokens"], "mask_ratio": jnp.mean(jnp.sum(resp, axis=-1) / n_maskable),
               "scheduled_ratio": jnp.mean(batch["ratios"][n]), "iteration": n.astype(jnp.float32)}
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(optim.applied_updates(state.opt_state, state.step))  # this update's lr
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return policy_step


# ----------------------------------------------------------------------------------------------------------------------
# Shardings and jit


def batch_shardings(batch: dict, mesh, rules) -> dict:
  """NamedShardings of an RLBatch: rows over the `activation_batch` mesh axes (axis 0, or axis 2 of [μ, K, B, ...]
  arrays), `mask_key` replicated. Raises if B is not divisible by the number of batch shards."""
  axes = tuple(a for a in rules.get("activation_batch", ()) if mesh.shape[a] > 1)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  spec_axes = None if not axes else (axes[0] if len(axes) == 1 else axes)
  out = {}
  for name, x in batch.items():
    ndim = len(x.shape)
    if name == "mask_key":
      out[name] = NamedSharding(mesh, PartitionSpec())
      continue
    axis = 2 if name in STACKED_KEYS else 0
    if x.shape[axis] % size:
      raise ValueError(f"RL batch {name!r} has {x.shape[axis]} rows (shape {tuple(x.shape)}), not divisible by the "
                       f"{size} batch shards of mesh axes {axes}: choose rl.prompts_per_step * rl.group_size as a "
                       f"multiple of {size}")
    parts = [None] * ndim
    parts[axis] = spec_axes
    out[name] = NamedSharding(mesh, PartitionSpec(*parts))
  return out


def logp_shardings(mesh, rules, with_ref: bool) -> dict:
  """Output shardings of the precompute: [μ, K, B, C] sharded over rows."""
  axes = tuple(a for a in rules.get("activation_batch", ()) if mesh.shape[a] > 1)
  spec = NamedSharding(mesh, PartitionSpec(None, None, None if not axes else (axes[0] if len(axes) == 1 else axes)))
  return {"old": spec, "ref": spec} if with_ref else {"old": spec}


def jit_policy_step(step_fn: Callable, state_shardings: TrainState, batch_sh: dict, mesh) -> Callable:
  """jit with explicit in/out shardings; the state (argument 0) is donated; n is a replicated int32 scalar."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, replicated), out_shardings=(state_shardings, None),
                 donate_argnums=0)


def jit_precompute(fn: Callable, param_shardings: Any, batch_sh: dict, mesh, rules, with_ref: bool) -> Callable:
  """jit of `make_precompute`'s function with explicit shardings (reference sharded like the policy)."""
  return jax.jit(fn, in_shardings=(param_shardings, param_shardings if with_ref else None, batch_sh),
                 out_shardings=logp_shardings(mesh, rules, with_ref))


def frozen_copy(params: Any, shardings: Any) -> Any:
  """A separate, identically sharded copy of `params` (the reference must survive the donation of the policy)."""
  return jax.jit(lambda p: jax.tree.map(lambda x: jnp.array(x, copy=True), p), out_shardings=shardings)(params)
