"""Sharded state creation: eval_shape → logical specs → mesh shardings → jit(init, out_shardings) (Decision 2)."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmada_jax.parallel import rules as rules_lib


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Mapping[str, rules_lib.Rule]):
  """Activates `mesh` and the logical rules, so that `nn.with_logical_constraint` inside models takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_lib.as_flax_rules(rules)):
    yield


def abstract_variables(model: nn.Module, batch: int = 1, length: int = 8) -> Any:
  """Shapes, dtypes and logical partitioning metadata of `model.init` without allocating anything."""
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), ids)


def logical_specs(boxed_tree: Any) -> Any:
  """Tree of PartitionSpecs whose entries are logical axis names."""
  return nn.get_partition_spec(boxed_tree)


def mesh_shardings(boxed_tree: Any, mesh: Mesh, rules: Mapping[str, rules_lib.Rule]) -> Any:
  """NamedShardings for every leaf of a boxed (logically partitioned) tree under `rules`.

  A mesh axis is used for a dimension only when it divides the dimension; otherwise that dimension is replicated
  (tiny test models and odd vocabulary sizes stay valid on any mesh).
  """
  specs = logical_specs(boxed_tree)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_tree))

  def to_sharding(spec: PartitionSpec, shape) -> NamedSharding:
    parts = []
    for name, dim in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
      axes = rules.get(name, ()) if name is not None else ()
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      size = 1
      for a in axes:
        size *= mesh.shape[a]
      if not axes or dim % size:
        parts.append(None)
      else:
        parts.append(axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(*parts))

  return jax.tree.map(to_sharding, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded_params(model: nn.Module, rng: jax.Array, mesh: Mesh, rules: Mapping[str, rules_lib.Rule]):
  """Random parameters created directly sharded (never materialised on one device). Returns (params, shardings)."""
  boxed = abstract_variables(model)["params"]
  shardings = mesh_shardings(boxed, mesh, rules)

  def init(key):
    return nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])

  with axis_rules(mesh, rules):
    params = jax.jit(init, out_shardings=shardings)(rng)
  return params, shardings


def param_shardings(model: nn.Module, mesh: Mesh, rules: Mapping[str, rules_lib.Rule]) -> Any:
  """NamedShardings of the model's parameters under `rules`."""
  return mesh_shardings(abstract_variables(model)["params"], mesh, rules)


def batch_sharding(mesh: Mesh, rules: Mapping[str, rules_lib.Rule], ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over the `activation_batch` mesh axes, the rest replicated."""
  axes = tuple(a for a in rules.get("activation_batch", ()) if mesh.shape[a] > 1)
  first = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))
