"""A synthetic official checkpoint of a chosen size, for measuring the memory of `mmada-jax convert`
(`mmada-jax memcheck`)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from mmada_jax.convert import official, safetensors_io as st


def write_synthetic(path: str, s: official.Shape, shard_bytes: int) -> tuple[int, int]:
  """A random bf16 official checkpoint directory; returns (total tensor bytes, largest tensor bytes)."""
  os.makedirs(path)
  table = {official.PREFIX + k: v[3] for k, v in official.top_table(s).items()}
  for i in range(s.num_layers):
    table.update({f"{official.PREFIX}blocks.{i}.{k}": v[3] for k, v in official.block_table(s).items()})
  specs = {k: (shape, np.dtype(ml_dtypes.bfloat16)) for k, shape in table.items()}
  rng = np.random.default_rng(0)

  def produce(name):
    shape = specs[name][0]
    return (rng.standard_normal(int(np.prod(shape)), np.float32) * 0.02).astype(ml_dtypes.bfloat16).reshape(shape)

  files = official._shard(specs, shard_bytes)  # the same split as an export would choose
  weight_map = {}
  for name, (order, meta) in files.items():
    st.write_file(os.path.join(path, name), order, specs, produce, meta)
    weight_map.update({k: name for k in order})
  sizes = [int(np.prod(sh)) * 2 for sh, _ in specs.values()]
  with open(os.path.join(path, st.INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(official.synthesize_config_json(s, {}), f, indent=2)
  return sum(sizes), max(sizes)
