"""The jitted masked-denoising train step: `(state, batch) -> (state, metrics)`.

Per step (Decisions 5 and 6):
  1. corrupt the whole global batch on device from `fold_in(seed key, step)` and per-example ids, so the masks do not
     depend on sharding or on the number of micro-batches;
  2. the loss denominators of each task (they depend on the masks only) for the whole batch;
  3. `lax.scan` over micro-batches accumulating gradients of Σ_task coeff · numerator / denominator — dividing once by
     the whole batch's denominators makes 4 × ¼-batch equal one full batch;
  4. clip + AdamW update — applied only when the loss and the gradient norm are finite.

Non-finite steps (Decision: skip, never poison the state): when `loss` or `grad_norm` is NaN/inf the step returns the
*old* parameters and optimiser state (selected inside the jitted program with `jnp.where`, so nothing leaves the device)
and reports `finite = 0`, `skipped = 1`. Step-counter policy: `state.step` still advances — it is the position of the
data iterator and the key of the on-device corruption, and checkpoints are numbered by it — while the optimiser's own
update count (inside `opt_state`, which drives the optax learning-rate schedule and Adam's bias correction) does not.
The loop counts skipped steps and stops after `train.max_nonfinite_steps` consecutive ones (train/faults.py).

Sharding of the gradient accumulators: with `param_shardings` (the parameters' NamedShardings, as `loop.setup` passes
them), the zero-initialised accumulators of the micro-batch scan and every micro-batch gradient are constrained to the
parameters' sharding, so XLA keeps them sharded like the parameters (FSDP) instead of replicated or gathered.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import optax

from mmada_jax.train import optim
from mmada_jax.train.state import TrainState

Batch = Mapping[str, Mapping[str, jax.Array]]  # task -> {name: [rows, ...]}


class LossHooks(Protocol):
  """What the train step needs from the diffusion objective."""

  def corrupt(self, batch: Batch, key: jax.Array) -> Batch:
    """Noisy inputs, targets and weights for every task, from clean layouts; masks from fold_in(key, example_id)."""

  def denominators(self, corrupted: Batch) -> dict[str, jax.Array]:
    """Per-task loss denominators of a (whole) corrupted batch."""

  def numerators(self, params: Any, corrupted: Batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Per-task loss numerators of a micro-batch, and additive metrics (e.g. masked-token counts)."""


def add_example_ids(batch: Batch) -> dict:
  """Gives every row its index in the global batch (per task) unless the data already carries `example_id`."""
  out = {}
  for task, arrays in batch.items():
    arrays = dict(arrays)
    if "example_id" not in arrays:
      rows = next(iter(arrays.values())).shape[0]
      arrays["example_id"] = jnp.arange(rows, dtype=jnp.int32)
    out[task] = arrays
  return out


def split_micro(batch: Batch, n: int) -> dict:
  """[rows, ...] -> [n, rows / n, ...] for every array (rows of each task split into n equal consecutive parts)."""
  return {t: {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in arrays.items()} for t, arrays in batch.items()}


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the scalar `finite` is true, else `old` (leaf by leaf; bit-identical to `new` when finite)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def sharding_constraint(param_shardings: Any | None) -> Callable[[Any], Any]:
  """tree -> tree constrained to `param_shardings` (identity when None)."""
  if param_shardings is None:
    return lambda tree: tree
  return lambda tree: jax.lax.with_sharding_constraint(tree, param_shardings)


def make_train_step(hooks: LossHooks, tx: optax.GradientTransformation, coefficients: Mapping[str, float],
                    micro_batches: int, seed: int, lr_schedule: Callable | None = None,
                    param_shardings: Any | None = None) -> Callable:
  """The pure step function (jit it with shardings and donation, see `jit_train_step`).

  Args:
    param_shardings: optional pytree of shardings matching `state.params`; gradient accumulators are constrained to it.
  """
  coeffs = dict(coefficients)
  constrain = sharding_constraint(param_shardings)

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    corrupted = hooks.corrupt(add_example_ids(batch), key)
    dens = {t: jnp.maximum(d.astype(jnp.float32), 1e-9) for t, d in hooks.denominators(corrupted).items()}

    def micro_loss(params, micro):
      nums, aux = hooks.numerators(params, micro)
      loss = sum(coeffs[t] * nums[t] / dens[t] for t in nums)
      return loss, (nums, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if micro_batches == 1:
      (loss, (nums, aux)), grads = grad_fn(state.params, corrupted)
    else:
      def body(carry, micro):
        g_acc, l_acc, n_acc, a_acc = carry
        (l, (n, a)), g = grad_fn(state.params, micro)
        g = constrain(g)
        add = lambda x, y: jax.tree.map(jnp.add, x, y)
        return (add(g_acc, g), l_acc + l, add(n_acc, n), add(a_acc, a)), None

      zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
      first = split_micro(corrupted, micro_batches)
      n0, a0 = jax.eval_shape(lambda: hooks.numerators(state.params, jax.tree.map(lambda x: x[0], first)))
      z = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
      (grads, loss, nums, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), z(n0), z(a0)), first)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = keep_if_finite(finite, (params, opt_state), (state.params, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
               "skipped": 1.0 - finite.astype(jnp.float32)}
    metrics.update({f"loss_{t}": nums[t] / dens[t] for t in nums})
    metrics.update(aux)
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(optim.applied_updates(state.opt_state, state.step))  # this update's lr
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(step_fn: Callable, state_shardings: TrainState, batch_shardings: Any) -> Callable:
  """jit with explicit in/out shardings; the state is donated (updated in place)."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                 donate_argnums=0)
