"""Ahead-of-time compilation of the train step for a Cloud TPU topology, on any host with `libtpu` installed.

`mmada-jax compile --config experiments/mmada_8b_stages.py:1.1 --topology v5p-128` builds compile-only TPU devices
(`jax.experimental.topologies`), the configured mesh over them, the abstract sharded train state and batch, and asks
XLA to compile the jitted step. It prints per-chip memory (arguments, outputs, temporaries, code) against the chip's
HBM, XLA's estimated step time and the implied MFU; the exit status is non-zero when the step does not fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # libtpu topology prefix
  hbm_gib: float  # per chip
  peak_tflops: float  # dense bf16 per chip
  cores_per_chip: int  # how the product name counts (v4-N and v5p-N count TensorCores)
  dims: int  # torus dimensions


CHIPS = {
    "v4": Chip("v4", 32.0, 275.0, 2, 3),
    "v5p": Chip("v5p", 95.0, 459.0, 2, 3),
    "v5e": Chip("v5e", 16.0, 197.0, 1, 2),
    "v6e": Chip("v6e", 32.0, 918.0, 1, 2),
}


class TopologyError(ValueError):
  """An unknown or malformed TPU topology name."""


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The most cube-like power-of-two grid with `chips` chips (v5e-16 -> 4x4, v5p-128 (64 chips) -> 4x4x4)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips: only power-of-two slice sizes are supported")
  grid = [1] * dims
  for _ in range(int(math.log2(chips))):
    grid[grid.index(min(grid))] *= 2
  if dims == 3 and chips == 4:
    grid = [2, 2, 1]  # the v4-8 / v5p-8 host
  return tuple(sorted(grid)) if dims == 2 else tuple(grid)


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5p-128' -> (v5p chip, (4, 4, 4)); 'v5e-16' / 'v5litepod-16' -> (v5e, (4, 4))."""
  gen, sep, count = name.lower().replace("v5litepod", "v5e").partition("-")
  if not sep or gen not in CHIPS or not count.isdigit():
    raise TopologyError(f"unknown TPU topology {name!r}: expected e.g. v4-32, v5e-16, v5p-128, v6e-256 "
                        f"(generations {sorted(CHIPS)})")
  chip = CHIPS[gen]
  chips = int(count) // chip.cores_per_chip
  if chips < 1:
    raise TopologyError(f"{name}: {count} is fewer than one chip")
  return chip, chip_grid(chips, chip.dims)


def tpu_devices(name: str, num_slices: int = 1) -> tuple[list, Chip]:
  """Compile-only devices of `num_slices` slices of topology `name`."""
  chip, grid = parse_topology(name)
  # Without these libtpu probes the (absent) TPU metadata server and logs errors before falling back.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only devices need no exclusive hold of a chip: don't fail when another process has libtpu loaded.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.generation}-{math.prod(grid) * chip.cores_per_chip}")
  from jax.experimental import topologies

  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{chip.generation}:{'x'.join(map(str, grid))}",
                                        **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise TopologyError("AOT compilation for TPU needs libtpu: pip install -e '.[tpu]'") from None
    raise
  return list(topo.devices), chip


def abstract_batch(config, mesh, rules) -> dict:
  """ShapeDtypeStructs of one global training batch (the layouts of tokens/prompting.py)."""
  length = int(config.data.max_text_len) + int(config.vocab.num_image_tokens) + 3
  sharding = partitioning.batch_sharding(mesh, rules, 2)
  batch = {}
  for task in ("t2i", "lm", "mmu"):
    rows = int(config.data[f"batch_size_{task}"])
    if rows:
      batch[task] = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding)
                     for k in ("input_ids", "labels", "valid_mask", "prompt_mask")}
  return batch


def compile_train_step(config, devices: list) -> tuple[Any, dict]:
  """Lowers and compiles the configured train step over `devices`; returns (compiled, facts)."""
  from mmada_jax.diffusion.losses import Objective
  from mmada_jax.models import llada
  from mmada_jax.train import optim, state as state_lib, step as step_lib

  mesh = mesh_lib.create_mesh(config.sharding, devices)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  hooks = Objective(config, model)
  fn = step_lib.make_train_step(hooks, tx, hooks.coefficients, int(config.train.micro_batches), int(config.seed))
  batch = abstract_batch(config, mesh, rules)
  with partitioning.axis_rules(mesh, rules):
    compiled = jax.jit(fn, out_shardings=(shardings, None), donate_argnums=0).lower(abstract, batch).compile()
  return compiled, {"mesh": dict(mesh.shape), "batch": batch}


def report(compiled, chip: Chip, config, batch: dict, n_devices: int) -> dict:
  """Per-chip memory against HBM, XLA's estimated step time and the implied MFU."""
  from mmada_jax.train import flops as flops_lib

  mem = compiled.memory_analysis()
  gib = 2.0 ** 30
  used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
          + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  seconds = float(cost.get("optimal_seconds", 0.0))
  model_flops = sum(flops_lib.train_step_flops(config.model, b["input_ids"].shape[0], b["input_ids"].shape[1],
                                               b["input_ids"].shape[1]) for b in batch.values())
  out = {
      "arguments_gib": mem.argument_size_in_bytes / gib, "outputs_gib": mem.output_size_in_bytes / gib,
      "aliased_gib": mem.alias_size_in_bytes / gib, "temporaries_gib": mem.temp_size_in_bytes / gib,
      "code_gib": mem.generated_code_size_in_bytes / gib, "total_gib": used / gib, "hbm_gib": chip.hbm_gib,
      "fits": used <= chip.hbm_gib * gib, "xla_estimated_step_s": seconds,
  }
  # XLA's cost model counts the body of a loop once, so with scanned layers (or micro-batches) its time is far too
  # low; the MFU is only derived when the step has neither.
  if seconds > 0 and not config.model.scan_layers and int(config.train.micro_batches) == 1:
    out["estimated_mfu"] = model_flops / seconds / (chip.peak_tflops * 1e12 * n_devices)
  return out
