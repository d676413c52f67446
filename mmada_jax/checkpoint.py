"""Orbax parameter checkpoints with metadata (converted official weights, `--init_from`).

A parameter checkpoint is a directory holding two Orbax items:
  params    the parameter pytree (numpy or jax arrays; dtypes kept, bf16 stays bf16)
  metadata  JSON: what the tree is (`kind`), the layer layout (stacked/unstacked), the model shape and vocabulary
            facts it was made for, and what is needed to export it back byte for byte.

Loading compares the metadata with the caller's expectations first, so a mismatched load fails with a sentence naming
the differing facts rather than an opaque pytree-structure error.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "mmada-jax-params"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not match what the caller expects."""


def _type_handlers():
  """Orbax's handlers, except that host (numpy) arrays are written without first deep-copying them.

  The default copy guards against arrays changing during an asynchronous save; these saves are synchronous, and the
  copy would double the memory of converting an 8B checkpoint (measured with `python -m mmada_jax.convert.memcheck`).
  """
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, th.ArrayHandler()),
      (str, th.StringHandler()))


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      params=ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers(), use_compression=False),
      metadata=ocp.JsonCheckpointHandler()))


def save_params(path: str, params: Any, metadata: Mapping[str, Any], *, overwrite: bool = False) -> None:
  """Writes `params` and `metadata` to directory `path` (refuses to replace an existing one unless `overwrite`)."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path} already exists; refusing to overwrite it (choose another output path)")
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
  _checkpointer().save(path, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                                     metadata=ocp.args.JsonSave(meta)), force=overwrite)


def read_metadata(path: str) -> dict:
  """The metadata item of a parameter checkpoint."""
  path = os.path.abspath(path)
  meta_file = os.path.join(path, "metadata", "metadata")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  if not os.path.exists(meta_file):
    raise CheckpointError(f"{path} is not an mmada-jax parameter checkpoint (no metadata item)")
  with open(meta_file) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
  return meta


def check_metadata(meta: Mapping[str, Any], expected: Mapping[str, Any], path: str = "checkpoint") -> None:
  """Raises CheckpointError listing every `expected` entry (dotted keys allowed) that differs from `meta`."""
  diffs = []
  for dotted, want in expected.items():
    node: Any = meta
    for part in dotted.split("."):
      node = node.get(part) if isinstance(node, Mapping) else None
    if node != want:
      diffs.append(f"{dotted}: checkpoint has {node!r}, expected {want!r}")
  if diffs:
    raise CheckpointError(f"{path} does not match the requested model:\n  " + "\n  ".join(diffs))


def _tree_metadata(path: str) -> Any:
  """Shapes/dtypes of the saved params, as a tree of ShapeDtypeStruct-like metadata."""
  handler = ocp.PyTreeCheckpointHandler()
  from etils import epath

  return handler.metadata(epath.Path(path) / "params").tree


def load_params(path: str, *, expected: Mapping[str, Any] | None = None, shardings: Any = None,
                as_numpy: bool = False) -> tuple[Any, dict]:
  """Restores `(params, metadata)`.

  Args:
    expected: metadata entries that must match (e.g. {"layer_layout": "stacked", "model.vocab_size": 134656}).
    shardings: optional pytree of `jax.sharding.Sharding` matching the params: arrays are restored directly sharded.
    as_numpy: restore host numpy arrays instead of jax arrays.
  """
  path = os.path.abspath(path)
  meta = read_metadata(path)
  if expected:
    check_metadata(meta, expected, path)
  tree = _tree_metadata(path)
  if as_numpy:
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  elif shardings is not None:
    restore_args = jax.tree.map(lambda m, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=m.shape, dtype=m.dtype),
                                tree, shardings)
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape,
                                                               dtype=m.dtype), tree)
  restored = _checkpointer().restore(path, args=ocp.args.Composite(
      params=ocp.args.PyTreeRestore(restore_args=restore_args)))
  return restored["params"], meta


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints: train state + data iterator state + resolved config, one Orbax CheckpointManager per run.


class TrainCheckpointer:
  """WORKDIR/checkpoints/<step>/{state, data, config}; async saves, keep-last-N plus keep-every-K.

  Restoring takes an abstract state whose leaves carry the *current* shardings, so a run saved under one sharding
  preset or mesh resumes under another.
  """

  def __init__(self, directory: str, ckpt_config):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt_config.keep), keep_period=int(ckpt_config.keep_period) or None,
        enable_async_checkpointing=bool(ckpt_config.async_save), create=True)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(use_compression=False),
        "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Mapping | None, config_dict: Mapping, force: bool = False) -> bool:
    args = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(dict(config_dict)),
            "data": ocp.args.JsonSave(dict(data_state or {}))}
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state placed on the shardings of `abstract_state`, data iterator state, saved config)."""
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
