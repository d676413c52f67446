"""Orbax parameter checkpoints with metadata (converted official weights, `--init_from`).

A parameter checkpoint is a directory holding two Orbax items:
  params    the parameter pytree (numpy or jax arrays; dtypes kept, bf16 stays bf16)
  metadata  JSON: what the tree is (`kind`), the layer layout (stacked/unstacked), the model shape and vocabulary
            facts it was made for, and what is needed to export it back byte for byte.

Loading compares the metadata with the caller's expectations first, so a mismatched load fails with a sentence naming
the differing facts rather than an opaque pytree-structure error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

FORMAT = "mmada-jax-params"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not match what the caller expects."""


def _type_handlers():
  """Orbax's handlers, except that host (numpy) arrays are written without first deep-copying them.

  The default copy guards against arrays changing during an asynchronous save; these saves are synchronous, and the
  copy would double the memory of converting an 8B checkpoint (measured with `mmada-jax memcheck`).
  """
  th = ocp.type_handlers
  try:
    numpy_handler = th.NumpyHandler(deepcopy_host_arrays=False)
  except TypeError:  # older orbax-checkpoint has no such option: its default handler
    numpy_handler = th.NumpyHandler()
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, numpy_handler), (jax.Array, th.ArrayHandler()), (str, th.StringHandler()))


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


def backbone_metadata(config, **extra: Any) -> dict:
  """Metadata of a backbone parameter checkpoint written from a run of `config` (read back by `train.init_from`,
  `--params` and the UniGRPO reference)."""
  return {"kind": "mmada_backbone", "layer_layout": "stacked" if config.model.scan_layers else "unstacked",
          "model": {k: config.model[k] for k in ("num_layers", "d_model", "num_heads", "vocab_size")}, **extra}


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


# Facts a training checkpoint must share with the config that resumes it (the saved `config` item is compared before
# the state is read, so a mismatch is a sentence, not a pytree error).
COMPATIBILITY_KEYS = ("model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads", "model.head_dim",
                      "model.mlp_hidden", "model.vocab_size", "model.scan_layers", "vocab.text_vocab_size",
                      "vocab.codebook_size", "vocab.image_offset", "vocab.mask_id")
MANIFEST = "mmada_manifest.json"  # per step: size (and sha256) of every file, written once the step is committed
MANIFEST_MODES = ("sha256", "size", "none")


def _dotted(tree: Mapping[str, Any], dotted: str) -> Any:
  node: Any = tree
  for part in dotted.split("."):
    node = node.get(part) if isinstance(node, Mapping) else None
  return node


def compatibility_errors(saved: Mapping[str, Any], current: Mapping[str, Any],
                         keys: tuple[str, ...] = COMPATIBILITY_KEYS) -> list[str]:
  """`key: checkpoint has X, this config has Y` for every key of `keys` that differs (layer layout named as such)."""
  out = []
  for key in keys:
    a, b = _dotted(saved, key), _dotted(current, key)
    if a != b:
      what = " (layer layout: stacked if true, unstacked if false)" if key == "model.scan_layers" else ""
      out.append(f"{key}{what}: checkpoint has {a!r}, this config has {b!r}")
  return out


class CorruptCheckpointError(CheckpointError):
  """A checkpoint step's files are missing, truncated or altered."""


def _file_digest(path: str, with_hash: bool) -> dict:
  entry: dict = {"size": os.path.getsize(path)}
  if with_hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    entry["sha256"] = h.hexdigest()
  return entry


def _step_files(step_dir: str) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, step_dir)
      if rel not in (MANIFEST, MANIFEST + ".tmp"):
        out[rel] = full
  return out


def write_manifest(step_dir: str, mode: str) -> None:
  """Records every file of a committed step (size, and sha256 when `mode` is "sha256") in `MANIFEST`."""
  if mode == "none" or os.path.exists(os.path.join(step_dir, MANIFEST)):
    return
  files = {rel: _file_digest(full, mode == "sha256") for rel, full in sorted(_step_files(step_dir).items())}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"mode": mode, "files": files}, f)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> bool:
  """Raises CorruptCheckpointError naming the first missing / truncated / altered file; False when the step has no
  manifest (written before this check existed, or killed between commit and manifest), True when it verified."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(f"{path}: unreadable manifest ({e})") from e
  for rel, want in files.items():
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CorruptCheckpointError(f"{full} is missing")
    got = _file_digest(full, "sha256" in want)
    if got["size"] != want["size"]:
      raise CorruptCheckpointError(f"{full} has {got['size']} bytes, {want['size']} were written (truncated?)")
    if got.get("sha256") != want.get("sha256"):
      raise CorruptCheckpointError(f"{full}: content differs from what was written (sha256 mismatch)")
  return True


class TrainCheckpointer:
  """WORKDIR/checkpoints/<step>/{state, data, config}; async saves, keep-last-N plus keep-every-K.

  Restoring takes an abstract state whose leaves carry the *current* shardings, so a run saved under one sharding
  preset or mesh resumes under another.

  Fault handling: a step is written by Orbax into a temporary directory and renamed when committed (a kill during an
  asynchronous write leaves only the temporary directory, which is ignored and cleaned up); once committed, a manifest
  of its files (size and sha256, `checkpoint.manifest`) is added. `restore_latest` verifies the newest step against
  its manifest, compares its saved config with the current one (refusing an incompatible model with the differences
  listed), and falls back to the newest valid step when one is corrupt, moving the bad one aside to
  `<checkpoints>.corrupt/<step>` with a warning (nothing is deleted).
  """

  def __init__(self, directory: str, ckpt_config):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt_config.keep), keep_period=int(ckpt_config.keep_period) or None,
        enable_async_checkpointing=bool(ckpt_config.async_save), create=True, cleanup_tmp_directories=True)
    self.directory = os.path.abspath(directory)
    self.manifest_mode = str(ckpt_config.get("manifest", "sha256"))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(use_compression=False),
        "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: Mapping | None, config_dict: Mapping, force: bool = False) -> bool:
    self.wait()  # the previous step is committed (Orbax would wait here anyway) and gets its manifest
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

  def saved_config(self, step: int) -> dict:
    """The `config` item of a step (no array is read)."""
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_latest(self, abstract_state: Any, config_dict: Mapping[str, Any] | None = None,
                     keys: tuple[str, ...] = COMPATIBILITY_KEYS, move_aside: bool = True,
                     log: Callable[[str], None] | None = None) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data state, saved config) of the newest valid step, or None when there is no step.

    A step whose files fail the manifest check, or (without a manifest) whose items cannot be read, is corrupt: a
    warning names it and it is moved aside (`move_aside`) or just skipped. A valid step written for another model
    (`keys` of `config_dict` differ) raises CheckpointError listing the differences, and so does a directory whose
    steps are all corrupt (rather than silently starting afresh).
    """
    warn = log or (lambda m: warnings.warn(m, stacklevel=2))
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      try:
        verified = verify_manifest(self.step_dir(step))
      except CorruptCheckpointError as e:
        self._corrupt(step, e, move_aside, warn)
        continue
      try:
        saved = self.saved_config(step)
      except Exception as e:  # pylint: disable=broad-except  # unreadable JSON / missing item: corrupt
        self._corrupt(step, e, move_aside, warn)
        continue
      if config_dict is not None:
        diffs = compatibility_errors(saved, config_dict, keys)
        if diffs:
          raise CheckpointError(f"checkpoint {self.step_dir(step)} was written for another model; refusing to restore "
                                f"it:\n  " + "\n  ".join(diffs) + "\n(use the config it was written with, or "
                                "another workdir)")
      try:
        state, data, config = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        if verified:  # intact files: not corruption, a real incompatibility or bug — do not hide it
          raise
        self._corrupt(step, e, move_aside, warn)
        continue
      return step, state, data, config
    if steps:
      where = f"moved to {self.directory}.corrupt" if move_aside else f"left in {self.directory}"
      raise CheckpointError(f"no valid checkpoint in {self.directory}: steps {sorted(steps)} are all corrupt "
                            f"({where}); restore one by hand or use a new workdir")
    return None

  def _corrupt(self, step: int, error: Exception, move_aside: bool, warn: Callable[[str], None]) -> None:
    where = self.step_dir(step)
    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if move_aside and jax.process_index() == 0:
      aside = os.path.join(self.directory + ".corrupt", str(step))
      n = 1
      while os.path.exists(aside):
        aside, n = os.path.join(self.directory + ".corrupt", f"{step}.{n}"), n + 1
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(where, aside)
      self.manager.reload()
      warn(f"checkpoint step {step} is corrupt ({detail}); moved it aside to {aside} and falling back to an earlier "
           f"step")
    else:
      warn(f"checkpoint step {step} is corrupt ({detail}); left it in place at {where} and trying an earlier step")

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self.all_steps():
        if os.path.isdir(self.step_dir(step)):
          write_manifest(self.step_dir(step), self.manifest_mode)

  def close(self) -> None:
    self.wait()
    self.manager.close()
