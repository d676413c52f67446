"""The jitted device programs of a UniGRPO run, and an explicit cache of them.

`RLPrograms` holds the two entry points of rl/step.py, jitted with the shardings of the run's mesh, with the batch
shardings they expect. `ProgramCache` keeps programs per (model, step settings, optimiser, mesh, rules, batch
layout): `setup` calls that share one cache (tests, a run resumed in the same process) reuse the compiled programs
instead of compiling them again. There is no process-wide cache: a caller that wants sharing passes one.
jax.jit compiles at the first call, so building programs that are never called costs no compilation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import optax
from flax.typing import VariableDict
from jax.sharding import Mesh, NamedSharding

from mmada_jax.models import llada
from mmada_jax.parallel import rules as rules_lib
from mmada_jax.rl import step as step_lib
from mmada_jax.train import optim, state as state_lib

Batch = dict[str, jax.Array]  # an RLBatch on the device (rl/step.py module docstring)
Metrics = dict[str, jax.Array]  # f32 scalars


@dataclasses.dataclass(frozen=True)
class RLPrograms:
  """The jitted functions of one RL run (B = rows = prompts × G, P + C = prompt + response positions).

  precompute: `(params, ref_params or None, batch) -> {"old": f32 [μ, K, B, C], "ref": f32 [μ, K, B, C]}` — the old
    (and, when β > 0, reference) log-probabilities of every mask of the step (`step.make_precompute`); `batch` is the
    RLBatch (tokens [B, P + C], ratios [μ, K, B], ...) placed on `batch_shardings`.
  step: `(state, batch, n) -> (state, metrics)` — policy step n (a replicated int32 scalar, one program for every n)
    on the RLBatch plus the precompute's outputs, placed on `full_shardings`; the state is donated; metrics are f32
    scalars (`step.make_policy_step`).
  batch_shardings: the NamedShardings of the RLBatch arrays (rows over the batch axes).
  full_shardings: `batch_shardings` plus those of "old" / "ref" [μ, K, B, C].
  """
  precompute: Callable[[VariableDict, VariableDict | None, Batch], Batch]
  step: Callable[[state_lib.TrainState, Batch, jax.Array], tuple[state_lib.TrainState, Metrics]]
  batch_shardings: dict[str, NamedSharding]
  full_shardings: dict[str, NamedSharding]


def build_programs(config: ml_collections.ConfigDict, model: llada.Transformer, tx: optax.GradientTransformation,
                   mesh: Mesh, rules: dict[str, rules_lib.Rule], shardings: state_lib.TrainState,
                   settings: step_lib.StepSettings, batch_sh: dict[str, NamedSharding]) -> RLPrograms:
  """Jits the precompute and the policy step (nothing is compiled before their first call)."""
  with_ref = settings.loss.beta > 0
  pre = step_lib.jit_precompute(step_lib.make_precompute(model, settings), shardings.params, batch_sh, mesh, rules,
                                with_ref)
  full_sh = dict(batch_sh, **step_lib.logp_shardings(mesh, rules, with_ref))
  pol = step_lib.make_policy_step(model, tx, settings, optim.learning_rate_schedule(config.optimizer),
                                  param_shardings=shardings.params)
  return RLPrograms(precompute=pre, step=step_lib.jit_policy_step(pol, shardings, full_sh, mesh),
                    batch_shardings=batch_sh, full_shardings=full_sh)


class ProgramCache:
  """RL programs keyed by everything they are compiled for; pass one to several `setup` calls to compile once."""

  def __init__(self) -> None:
    self._programs: dict[tuple, RLPrograms] = {}

  def __len__(self) -> int:
    return len(self._programs)

  def programs(self, config: ml_collections.ConfigDict, model: llada.Transformer, tx: optax.GradientTransformation,
               mesh: Mesh, rules: dict[str, rules_lib.Rule], shardings: state_lib.TrainState,
               settings: step_lib.StepSettings, batch_sh: dict[str, NamedSharding]) -> RLPrograms:
    """`build_programs(...)`, reused when the model, settings, optimiser config, mesh, rules and batch shardings
    equal those of an earlier call (the optimiser object `tx` is rebuilt from the same config every time)."""
    key = (model, settings, config.optimizer.to_json(), mesh, tuple(sorted(rules.items())),
           tuple(sorted((k, str(v)) for k, v in batch_sh.items())))
    if key not in self._programs:
      self._programs[key] = build_programs(config, model, tx, mesh, rules, shardings, settings, batch_sh)
    return self._programs[key]
