"""Loading experiment files: `FILE[:arg]` (a module with `get_config(arg)`) plus `--config.key=value` overrides."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from mmada_jax.config.defaults import ConfigDict
from mmada_jax.config.errors import ConfigError
from mmada_jax.config.validation import validate


def load_module(path: str):
  """Imports an experiment file as a module."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_mmada_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  return module


def load_config_file(path: str, arg: str | None = None) -> ConfigDict:
  """Imports an experiment file and calls its `get_config(arg)`; `path` may end in `:arg`."""
  if arg is None and ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  module = load_module(path)
  try:
    return module.get_config(arg) if arg is not None else module.get_config()
  except ValueError as e:  # e.g. an unknown variant
    raise ConfigError(f"{path}: {e}") from None


def parse_override_value(text: str, current: Any) -> Any:
  """Parses `text` into the type of the existing value `current`."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected a boolean, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    items = [t.strip() for t in text.strip("()[]").split(",") if t.strip()]
    elem = current[0] if current else ""
    return type(current)(parse_override_value(t, elem) for t in items)
  return text


def apply_overrides(config: ConfigDict, overrides: dict[str, str]) -> ConfigDict:
  """Applies `{"model.num_layers": "4", ...}` (values as strings, typed like the existing value)."""
  for dotted, text in overrides.items():
    parent, _, leaf = dotted.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
      if part not in node:
        raise ConfigError(f"--config.{dotted}: no such key '{part}' (known: {sorted(node.keys())})")
      node = node[part]
    if leaf not in node:
      if isinstance(node, ConfigDict) and dotted.startswith("sharding.rule_overrides."):
        with node.unlocked():
          node[leaf] = text
        continue
      raise ConfigError(f"--config.{dotted}: no such key '{leaf}' (known: {sorted(node.keys())})")
    try:
      node[leaf] = parse_override_value(text, node[leaf])
    except (ValueError, ConfigError) as e:
      raise ConfigError(f"--config.{dotted}={text}: {e}") from None
  return config


def load_config(path: str, overrides: dict[str, str] | None = None) -> ConfigDict:
  """Loads an experiment file, applies command-line overrides, validates, and locks the result."""
  config = load_config_file(path)
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  apply_overrides(config, overrides or {})
  validate(config)
  config.lock()
  return config
