"""Optimiser and learning-rate schedule (specs/mmada-official.md §4.4).

AdamW with the official hyper-parameters as defaults (β 0.9/0.999, ε 1e-8, weight decay 0.01 on every parameter, as the
official no-decay filter matches nothing), global-norm clipping, and a linear warm-up followed by a cosine decay to
`min_lr_scale · lr` — a real floor, unlike the official scheduler, which drops `min_lr_scale` for "cosine".
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_config) -> optax.Schedule:
  """lr(step): 0 → peak over `warmup_steps`, then peak·[m + (1−m)·½(1+cos(π·progress))] until `decay_steps`."""
  peak, warmup = float(opt_config.learning_rate), int(opt_config.warmup_steps)
  total, floor = int(opt_config.decay_steps), float(opt_config.min_lr_scale)
  kind = opt_config.schedule

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
      after = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    elif kind == "linear":
      after = peak * (1.0 - (1.0 - floor) * progress)
    else:  # constant
      after = jnp.full_like(step, peak)
    return jnp.where(step < warmup, warm, after)

  return schedule


def make_optimizer(opt_config) -> optax.GradientTransformation:
  """Clip by global norm (if > 0), then AdamW with the schedule."""
  adamw = optax.adamw(learning_rate_schedule(opt_config), b1=float(opt_config.b1), b2=float(opt_config.b2),
                      eps=float(opt_config.eps), weight_decay=float(opt_config.weight_decay),
                      mu_dtype=jnp.dtype(opt_config.mu_dtype))
  if float(opt_config.grad_clip) > 0:
    return optax.chain(optax.clip_by_global_norm(float(opt_config.grad_clip)), adamw)
  return adamw


def applied_updates(opt_state, fallback):
  """How many updates the optimiser has applied: the count its learning-rate schedule reads (skipped non-finite steps
  do not advance it, train/step.py), or `fallback` for an optimiser without a schedule state."""
  found = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
           if getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState"]
  return found[0] if found else fallback
