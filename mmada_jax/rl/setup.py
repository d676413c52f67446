"""Setting up a UniGRPO run: mesh, model, policy state (fresh or resumed), the frozen reference, prompts, rewards and
the jitted programs, gathered in an `RLRun`.

The *reference handle* is the parameter checkpoint holding the frozen reference: `train.init_from` when that is a
parameter checkpoint, otherwise WORKDIR/reference, written at the start of a run (random weights, or another run's
workdir whose latest step may still move). Checkpoints store it relative to the workdir when it is WORKDIR/reference,
so a workdir may be moved.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax.typing import VariableDict
from jax.sharding import Mesh

from mmada_jax import checkpoint as ckpt
from mmada_jax.data.tokenizer import shared_tokenizer
from mmada_jax.inference.image_tokenizer import ImageTokenizer
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, rules as rules_lib
from mmada_jax.rl import prompts as prompts_lib, rewards as rewards_lib, step as step_lib, t2i as t2i_lib
from mmada_jax.rl.programs import ProgramCache, RLPrograms
from mmada_jax.tokens import text_tokenizer as tt, vocab as vocab_lib
from mmada_jax.train import faults, loop as train_loop, optim, state as state_lib

REFERENCE_DIR = "reference"  # WORKDIR/reference: the frozen reference of runs started from random weights


@dataclasses.dataclass
class RLRun:
  """Everything a UniGRPO run holds between RL steps (`setup` makes it, `loop.train` advances it)."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  rules: dict[str, rules_lib.Rule]
  model: llada.Transformer
  tokenizer: tt.TextTokenizer
  vocab: vocab_lib.Vocab
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  ref_params: VariableDict | None  # the frozen reference, sharded like the policy; None when rl.kl_beta = 0
  ref_handle: str
  prompts: prompts_lib.PromptSource
  checkpointer: ckpt.TrainCheckpointer
  rewards: rewards_lib.RewardModel
  settings: step_lib.StepSettings
  programs: RLPrograms
  rl_step: int = 0
  guard: faults.NumericsGuard | None = None
  images: ImageTokenizer | None = None  # the MAGVIT decoder of t2i rollouts


def dims(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(P, C): static prompt and response positions of an RL row (text: rl.prompt_len, rl.gen_length)."""
  if config.rl.task == "t2i":
    return t2i_lib.dims(config)
  return int(config.rl.prompt_len), int(config.rl.gen_length)


def abstract_batch(config: ml_collections.ConfigDict, b: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of an RL batch of b rows (before the precompute) — enough to build its shardings."""
  r = config.rl
  p, c = dims(config)
  mu, k, length = int(r.inner_steps), int(r.masks_per_step), p + c
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {"tokens": s(b, length), "attn": s(b, length), "maskable": s(b, c), "eligible": s(b, c), "adv": s(b),
          "row_weight": s(b), "uid": s(b), "ratios": s(mu, k, b), "mask_key": s(2)}


def _is_param_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "metadata")) and os.path.isdir(os.path.join(path, "params"))


def reference(config: ml_collections.ConfigDict, workdir: str, state: state_lib.TrainState,
              shardings: state_lib.TrainState, resumed_handle: str | None,
              log: Callable[[str], None]) -> tuple[VariableDict, str]:
  """(frozen reference params sharded like the policy, handle).

  A fresh run's reference is its initial policy (π_θ ← π_ref, Algorithm 1): the handle is `train.init_from` when that
  is a parameter checkpoint, otherwise (random weights, or another run's workdir whose latest step may still move) a
  copy is saved to WORKDIR/reference. A resumed run reloads the reference from its saved handle.
  """
  if resumed_handle:
    expect = {"model.num_layers": config.model.num_layers, "model.d_model": config.model.d_model,
              "model.vocab_size": config.model.vocab_size}
    params, _ = ckpt.load_params(resumed_handle, expected=expect, shardings=shardings.params)
    return jax.tree.map(lambda p, a: p.astype(a.dtype), params, state.params), resumed_handle
  ref = step_lib.frozen_copy(state.params, shardings.params)
  init = config.train.init_from
  if init and _is_param_checkpoint(init):
    return ref, os.path.abspath(init)
  handle = os.path.join(os.path.abspath(workdir), REFERENCE_DIR)
  if not os.path.exists(handle):
    ckpt.save_params(handle, jax.device_get(ref), ckpt.backbone_metadata(config))
    log(f"saved the reference policy to {handle}")
  return ref, handle


def stored_handle(workdir: str, handle: str) -> str:
  """The reference handle as a checkpoint stores it: WORKDIR/reference relative (the workdir may move)."""
  return REFERENCE_DIR if handle == os.path.join(os.path.abspath(workdir), REFERENCE_DIR) else handle


def _restore(config: ml_collections.ConfigDict, workdir: str, checkpointer: ckpt.TrainCheckpointer,
             abstract: state_lib.TrainState, prompts: prompts_lib.PromptSource, guard: faults.NumericsGuard,
             log: Callable[[str], None]) -> tuple[state_lib.TrainState, int, str] | None:
  """(state, RL step, reference handle) of the workdir's latest checkpoint, with the prompt position and the numerics
  counters restored into `prompts` and `guard`; None when there is no checkpoint."""
  found = checkpointer.restore_latest(abstract, train_loop.config_json(config), log=log)
  if found is None:
    return None
  _, state, data_state, _ = found
  prompts.set_state(data_state.get("prompts", {}))
  guard.set_state(data_state.get("loop"))
  rl_step, handle = int(data_state["rl_step"]), data_state["reference"]
  handle = os.path.join(os.path.abspath(workdir), handle) if handle == REFERENCE_DIR else handle
  log(f"resumed from {checkpointer.directory} at RL step {rl_step}")
  return state, rl_step, handle


def setup(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print,
          cache: ProgramCache | None = None) -> RLRun:
  """Mesh, model, sharded policy state (resumed when the workdir has a checkpoint), reference, prompts, programs.

  `cache`: a `ProgramCache` shared with other `setup` calls of this process, whose compiled programs are reused when
  they match; None builds this run's own. Errors that need no compilation (the t2i settings, the batch rows vs the
  batch shards) are raised before anything is compiled or checkpointed.
  """
  t2i = config.rl.task == "t2i"
  if t2i:
    t2i_lib.check(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  b = int(config.rl.prompts_per_step) * int(config.rl.group_size)
  batch_sh = step_lib.batch_shardings(abstract_batch(config, b), mesh, rules)  # rows vs batch shards, before compiling
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  checkpointer = ckpt.TrainCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  tokenizer = shared_tokenizer(config)
  prompts = prompts_lib.make_prompts(config, tokenizer)
  guard = faults.NumericsGuard.from_config(config.train, what="rl")
  rl_step, handle = 0, None
  restored = _restore(config, workdir, checkpointer, abstract, prompts, guard, log)
  if restored is not None:
    state, rl_step, handle = restored
  else:
    state = train_loop.initial_state(config, model, tx, mesh, rules, abstract, shardings, log)
  ref, handle = reference(config, workdir, state, shardings, handle, log)
  settings = step_lib.StepSettings.from_config(config, vocab_slice=t2i_lib.vocab_slice(config) if t2i else None)
  programs = (ProgramCache() if cache is None else cache).programs(config, model, tx, mesh, rules, shardings,
                                                                   settings, batch_sh)
  return RLRun(config, workdir, mesh, rules, model, tokenizer, vocab_lib.Vocab.from_config(config.vocab), state,
               shardings, ref if settings.loss.beta > 0 else None, handle, prompts, checkpointer,
               rewards_lib.RewardModel.from_config(config.rl), settings, programs, rl_step, guard,
               t2i_lib.image_tokenizer(config, log) if t2i else None)
