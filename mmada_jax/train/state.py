"""The train state, created directly sharded (Decision 2): eval_shape → logical specs → mesh shardings → jit(init)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mmada_jax.parallel import partitioning
from mmada_jax.parallel import rules as rules_lib


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar; params: the model parameters (fp32 master weights by default); opt_state: optax state."""
  step: jax.Array
  params: Any
  opt_state: Any


def _init_fn(model: nn.Module, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """rng -> boxed TrainState. The optimizer state mirrors the boxed params, so it inherits their logical names."""

  def init(rng):
    params = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Mapping[str, rules_lib.Rule]) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state of ShapeDtypeStructs, NamedSharding tree) for the model + optimizer."""
  boxed = jax.eval_shape(_init_fn(model, tx), jax.random.key(0))
  shardings = partitioning.mesh_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return abstract, shardings


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                 rules: Mapping[str, rules_lib.Rule], shardings: TrainState) -> TrainState:
  """A fresh randomly initialised state, each array created on its shards."""
  init = _init_fn(model, tx)
  with partitioning.axis_rules(mesh, rules):
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """A state at step 0 around given (already sharded) parameters, e.g. converted official weights."""

  def build(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  return jax.jit(build, out_shardings=shardings)(params)
