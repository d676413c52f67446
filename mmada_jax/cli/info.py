"""`mmada-jax info --config FILE`: the resolved config, its parameter count and parameter bytes per device."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from mmada_jax.cli import common
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  common.parser("info", "Show a config, its parameter count and per-device parameter memory.").parse_args(cfg.rest)
  config = cfg.load()
  print(config)
  model = llada.build_model(config.model)
  boxed = partitioning.abstract_variables(model)["params"]
  leaves = jax.tree.leaves(nn.unbox(boxed))
  n_params = sum(int(np.prod(x.shape)) for x in leaves)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  shardings = partitioning.mesh_shardings(boxed, mesh, rules)
  per_device = 0
  for leaf, sh in zip(leaves, jax.tree.leaves(shardings)):
    per_device += int(np.prod(sh.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  print(f"parameters: {n_params:,} ({config.model.param_dtype})")
  print(f"mesh: {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} device(s), "
        f"preset {config.sharding.preset!r}")
  print(f"parameter bytes per device: {per_device / 2**30:.3f} GiB")
  return 0
