"""Ahead-of-time compilation of the train step or the UniGRPO step for a Cloud TPU topology, on any host with `libtpu`.

`mmada-jax compile --config experiments/mmada_8b_stages.py:1.1 --topology v5p-128 [--step rl]` builds compile-only
TPU devices (`jax.experimental.topologies`), the configured mesh over them, the abstract sharded state and batch, and
asks XLA to compile the jitted step(s) exactly as the train / RL loop jits them. It prints per-chip memory (arguments,
outputs, temporaries, code, other resident buffers) against the chip's HBM, XLA's estimated step time and the implied
MFU; the exit status is non-zero when a program does not fit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from mmada_jax import config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.rl import step as rl_step
from mmada_jax.train import flops as flops_lib, optim, state as state_lib, step as step_lib


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
  lengths = config_lib.row_lengths(config)
  sharding = partitioning.batch_sharding(mesh, rules, 2)
  batch = {}
  for task in ("t2i", "lm", "mmu"):
    rows = int(config.data[f"batch_size_{task}"])
    if rows:
      batch[task] = {k: jax.ShapeDtypeStruct((rows, lengths[task]), jnp.int32, sharding=sharding)
                     for k in ("input_ids", "labels", "valid_mask", "prompt_mask")}
  return batch


def per_chip_bytes(tree: Any) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


@dataclasses.dataclass
class Program:
  """One compiled program and what its report needs."""
  name: str
  compiled: Any
  model_flops: float  # analytic FLOPs of one call (train/flops.py conventions)
  looped: bool  # has a loop whose body XLA's cost model counts once (scanned layers, micro-batches)
  resident_bytes: int = 0  # per chip: buffers alive during the call that are not its arguments (e.g. the reference)


def for_devices(config, devices: list):
  """`config` as it resolves on the target machine: `loss.head_groups = 0` means "the device count", which at run time
  is the TPU slice's, but in this compiling process would be the host's (1 CPU device: the whole global batch one
  compaction group, with logits for all its loss positions at once)."""
  if int(config.loss.head_groups) != 0:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.loss.head_groups = len(devices)
  return config


def _model_state(config, devices: list):
  """(mesh, rules, model, optimiser, abstract sharded state, state shardings) of `config` over `devices`."""
  mesh = mesh_lib.create_mesh(config.sharding, devices)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  return mesh, rules, model, tx, abstract, shardings


def compile_train_step(config, devices: list) -> tuple[list[Program], dict]:
  """Lowers and compiles the configured train step over `devices` as `train/loop.py` jits it."""
  config = for_devices(config, devices)
  mesh, rules, model, tx, abstract, shardings = _model_state(config, devices)
  hooks = Objective(config, model)
  fn = step_lib.make_train_step(hooks, tx, hooks.coefficients, int(config.train.micro_batches), int(config.seed),
                                optim.learning_rate_schedule(config.optimizer), param_shardings=shardings.params)
  batch = abstract_batch(config, mesh, rules)
  with partitioning.axis_rules(mesh, rules):
    compiled = jax.jit(fn, out_shardings=(shardings, None), donate_argnums=0).lower(abstract, batch).compile()
  flops = sum(flops_lib.train_step_flops(config.model, b["input_ids"].shape[0], b["input_ids"].shape[1],
                                         b["input_ids"].shape[1]) for b in batch.values())
  looped = bool(config.model.scan_layers) or int(config.train.micro_batches) > 1
  return [Program("train step", compiled, flops, looped)], {"mesh": dict(mesh.shape)}


def rl_abstract_batch(config, mesh, rules, with_ref: bool) -> tuple[dict, dict]:
  """(RL batch before the precompute, the same with the old / reference log-probabilities) as sharded
  ShapeDtypeStructs: rows B = rl.prompts_per_step * rl.group_size, prompt rl.prompt_len, response rl.gen_length."""
  r = config.rl
  b, c = int(r.prompts_per_step) * int(r.group_size), int(r.gen_length)
  mu, k, t = int(r.inner_steps), int(r.masks_per_step), int(r.prompt_len) + c
  shapes = {"tokens": ((b, t), jnp.int32), "attn": ((b, t), jnp.int32), "maskable": ((b, c), jnp.bool_),
            "eligible": ((b, c), jnp.bool_), "adv": ((b,), jnp.float32), "row_weight": ((b,), jnp.float32),
            "uid": ((b,), jnp.int32), "ratios": ((mu, k, b), jnp.float32), "mask_key": ((2,), jnp.uint32)}
  logps = {"old": ((mu, k, b, c), jnp.float32)}
  if with_ref:
    logps["ref"] = ((mu, k, b, c), jnp.float32)
  plain = {n: jax.ShapeDtypeStruct(*v) for n, v in {**shapes, **logps}.items()}
  sh = rl_step.batch_shardings(plain, mesh, rules)  # raises when B does not split over the batch shards
  full = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh[n]) for n, x in plain.items()}
  return {n: full[n] for n in shapes}, full


def compile_rl_step(config, devices: list) -> tuple[list[Program], dict]:
  """Lowers and compiles UniGRPO's policy step and its old/reference log-probability precompute (rl/step.py) over
  `devices`, as `rl/programs.py` jits them. The frozen reference parameters stay resident during the policy step, the
  optimiser state during the precompute: each report counts them."""

  config = for_devices(config, devices)
  mesh, rules, model, tx, abstract, shardings = _model_state(config, devices)
  settings = rl_step.StepSettings.from_config(config)
  with_ref = settings.loss.beta > 0
  batch, full = rl_abstract_batch(config, mesh, rules, with_ref)
  pol = rl_step.make_policy_step(model, tx, settings, optim.learning_rate_schedule(config.optimizer),
                                 param_shardings=shardings.params)
  step_fn = rl_step.jit_policy_step(pol, shardings, {n: x.sharding for n, x in full.items()}, mesh)
  pre_fn = rl_step.jit_precompute(rl_step.make_precompute(model, settings), shardings.params,
                                  {n: x.sharding for n, x in batch.items()}, mesh, rules, with_ref)
  n = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
  with partitioning.axis_rules(mesh, rules):
    policy = step_fn.lower(abstract, full, n).compile()
    pre = pre_fn.lower(abstract.params, abstract.params if with_ref else None, batch).compile()
  r = config.rl
  rows, c = full["tokens"].shape[0] * int(r.masks_per_step), int(r.gen_length)
  fwd = rows * flops_lib.forward_flops(config.model, full["tokens"].shape[1], c)
  looped = bool(config.model.scan_layers) or int(r.micro_batches) > 1
  programs = [Program("UniGRPO policy step", policy, 3.0 * fwd, looped,
                      per_chip_bytes(abstract.params) if with_ref else 0),
              Program("UniGRPO old/reference log-probs", pre, fwd * int(r.inner_steps) * (2 if with_ref else 1),
                      True, per_chip_bytes((abstract.step, abstract.opt_state)))]
  return programs, {"mesh": dict(mesh.shape), "rows": full["tokens"].shape[0]}


def cost_model_seconds(program: Program) -> float:
  """XLA's estimated seconds for one call of the compiled program ("optimal_seconds"; 0 when it gives none)."""
  cost = program.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float((cost or {}).get("optimal_seconds", 0.0))


def extrapolated_estimate(config, devices: list, step: str, programs: list[Program], chip: Chip,
                          log=print) -> list[dict]:
  """XLA's step time for the configured depth, from two cheap compiles: XLA's cost model counts a loop body once, so
  with scanned layers or micro-batches its figure for the real program is far too low. This compiles 1- and 2-layer
  copies of the config with unrolled layers and one micro-batch (same widths, batch, mesh and sharding), takes the
  difference as one layer's time and extrapolates: t(L) = t(1) + (L - 1) (t(2) - t(1)). The MFU divides the real
  program's model FLOPs (`programs`, train/flops.py conventions) by t(L). One dict per program; programs whose small
  copies still loop (the UniGRPO precompute over its inner steps) get no estimate.
  """
  compile_fn = compile_rl_step if step == "rl" else compile_train_step
  layers = int(config.model.num_layers)
  times = []
  for n in (1, 2):
    small = copy.deepcopy(config)
    with small.unlocked():
      small.model.num_layers, small.model.scan_layers = n, False
      small.train.micro_batches, small.rl.micro_batches = 1, 1
    log(f"cost-model estimate: compiling a {n}-layer unrolled copy with one micro-batch ...")
    compiled, _ = compile_fn(small, devices)
    times.append([None if p.looped else cost_model_seconds(p) for p in compiled])
  out = []
  for i, program in enumerate(programs):
    t1, t2 = times[0][i], times[1][i]
    if not t1 or not t2:
      out.append({"program": program.name})
      continue
    seconds = t1 + (layers - 1) * (t2 - t1)
    out.append({"program": program.name, "cost_model_1_layer_s": t1, "cost_model_2_layers_s": t2,
                "extrapolated_step_s": seconds,
                "estimated_mfu": program.model_flops / seconds / (chip.peak_tflops * 1e12 * len(devices))})
  return out


def report(program: Program, chip: Chip, n_devices: int) -> dict:
  """Per-chip memory against HBM, XLA's estimated step time and the implied MFU of one compiled program."""
  mem = program.compiled.memory_analysis()
  gib = 2.0 ** 30
  used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
          + mem.generated_code_size_in_bytes + program.resident_bytes)
  seconds = cost_model_seconds(program)
  out = {
      "program": program.name, "arguments_gib": mem.argument_size_in_bytes / gib,
      "outputs_gib": mem.output_size_in_bytes / gib, "aliased_gib": mem.alias_size_in_bytes / gib,
      "temporaries_gib": mem.temp_size_in_bytes / gib, "code_gib": mem.generated_code_size_in_bytes / gib,
      "resident_gib": program.resident_bytes / gib, "total_gib": used / gib, "hbm_gib": chip.hbm_gib,
      "fits": used <= chip.hbm_gib * gib, "xla_estimated_step_s": seconds,
  }
  # XLA's cost model counts the body of a loop once, so with scanned layers (or micro-batches) its time is far too
  # low; the MFU is only derived when the program has neither.
  if seconds > 0 and not program.looped:
    out["estimated_mfu"] = program.model_flops / seconds / (chip.peak_tflops * 1e12 * n_devices)
  return out
