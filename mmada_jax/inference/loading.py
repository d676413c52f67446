"""Backbone parameters for inference: from a parameter checkpoint (`--params`, e.g. converted official weights) or
from a training run (`--workdir`: the parameters of one of its `checkpoints/<step>/state`, never the optimizer state).

Saved trees are checked against the configured model's parameter shapes before anything is read, and a mismatch names
the missing, unexpected and differently shaped parameters. Parameters come back in `model.param_dtype`; the sampler
programs cast them to the compute dtype and stack the kernels once (`llada.compute_params`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import official
from mmada_jax.inference.errors import InferenceError
from mmada_jax.models import llada
from mmada_jax.parallel import partitioning

Params = Any  # a parameter pytree of the backbone


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat}


def check_tree(saved: Any, expected: Any, where: str, config) -> None:
  """Raises CheckpointError naming missing / unexpected parameters and shape differences (`saved` vs the model)."""
  have, want = _flat_shapes(saved), _flat_shapes(expected)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = [f"{k}: checkpoint {have[k][0]}, model {want[k][0]}" for k in sorted(set(have) & set(want))
            if have[k][0] != want[k][0]]
  if not (missing or extra or shapes):
    return
  lines = []
  if missing:
    lines.append(f"missing in the checkpoint ({len(missing)}): {', '.join(missing[:6])}")
  if extra:
    lines.append(f"not in the model ({len(extra)}): {', '.join(extra[:6])}")
  lines += shapes[:8]
  raise ckpt.CheckpointError(f"{where} does not fit the config's model:\n  " + "\n  ".join(lines)
                             + f"\n  ({_layout_hint(have, config)})")


def _layout_hint(have: dict, config) -> str:
  try:
    stacked = official.detect_layout({k.split("/")[0]: None for k in have}) == "stacked"
  except official.ConversionError:  # neither layout: the shapes and names above say what is wrong
    stacked = bool(config.model.scan_layers)
  if stacked != bool(config.model.scan_layers):
    return (f"the checkpoint has {'stacked' if stacked else 'unstacked'} layers: set "
            f"--config.model.scan_layers={stacked}")
  return "check the model section of the config (num_layers, d_model, heads, mlp_hidden, vocab_size)"


def _saved_tree(item_dir: str) -> Any:
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree


def training_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of a training run (`WORKDIR/checkpoints/<step>/state`), ascending."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))


def _state_dir(workdir: str, step: int | None) -> tuple[str, int]:
  if not os.path.isdir(workdir):
    raise ckpt.CheckpointError(f"--workdir {workdir}: no such directory")
  steps = training_steps(workdir)
  if not steps:
    raise ckpt.CheckpointError(f"--workdir {workdir}: no training checkpoint (expected "
                               f"{os.path.join(workdir, 'checkpoints', '<step>', 'state')})")
  if step is not None and step not in steps:
    raise ckpt.CheckpointError(f"--workdir {workdir}: no checkpoint at step {step} (available: {steps})")
  step = steps[-1] if step is None else step
  return os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state")), step


def _restore_workdir_params(workdir: str, step: int | None, expected: Any, config) -> tuple[Any, str, int]:
  """(host parameters, state directory, step) of a training checkpoint, checked against the model's `expected`
  parameter shapes before anything is read; the optimizer state is never read."""
  item, step = _state_dir(workdir, step)
  tree = _saved_tree(item)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ckpt.CheckpointError(f"{item}: not a train state (no 'params' entry)")
  check_tree(tree["params"], expected, item, config)
  args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
  out = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item={"params": tree["params"]}, restore_args={"params": args}, partial_restore=True))
  return out["params"], item, step


def read_backbone(config, expected: Any, *, params: str | None = None, workdir: str | None = None,
                  step: int | None = None) -> tuple[Any, dict]:
  """(host parameters as saved, {"source", "step"}) from `params` or `workdir`, checked against `expected` shapes."""
  if params is not None:
    meta = ckpt.read_metadata(params)
    if meta.get("kind", "mmada_backbone") != "mmada_backbone":
      raise ckpt.CheckpointError(f"--params {params}: a {meta.get('kind')!r} checkpoint, not backbone parameters"
                                 + (" (pass it as --magvit)" if meta.get("kind") == "magvit" else ""))
    check_tree(_saved_tree(os.path.join(os.path.abspath(params), "params")), expected, params, config)
    host, _ = ckpt.load_params(params, as_numpy=True)
    source = os.path.abspath(params)
  else:
    host, source, step = _restore_workdir_params(workdir, step, expected, config)
  return host, {"source": source, "step": step}


def load_backbone(config, *, params: str | None = None, workdir: str | None = None, step: int | None = None,
                  log: Callable[[str], None] = print) -> tuple[llada.Transformer, Params, dict]:
  """(model, device parameters in `model.param_dtype`, {"source": path, "step": training step or None}) from exactly
  one of `params` (a parameter checkpoint) or `workdir` (a training run)."""
  if (params is None) == (workdir is None):
    raise InferenceError("give the model weights with exactly one of --params CKPT or --workdir DIR")
  if step is not None and workdir is None:
    raise InferenceError("--step selects a checkpoint of --workdir; it does not apply to --params")
  model = llada.build_model(config.model)
  expected = nn.unbox(partitioning.abstract_variables(model)["params"])
  host, info = read_backbone(config, expected, params=params, workdir=workdir, step=step)
  device = jax.tree.map(lambda h, e: jax.device_put(np.asarray(h).astype(e.dtype)), host, expected)
  log(f"parameters: {info['source']}" + ("" if info["step"] is None else f" (step {info['step']})"))
  return model, device, info
