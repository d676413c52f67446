"""What every subcommand shares: `--config FILE[:arg] --config.k=v` into a validated config, and argument parsers.

Only `mmada_jax.cli` parses command lines; library modules take a config and keyword arguments.
"""

from __future__ import annotations

import argparse

from ml_collections import ConfigDict

from mmada_jax import config as config_lib


def split_config_args(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
  """Separates `--config PATH` / `--config=PATH` and `--config.a.b=V` / `--config.a.b V` from other arguments:
  (path or None, {"a.b": "V", ...}, the other arguments in order)."""
  path, overrides, rest = None, {}, []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" or a.startswith("--config="):
      if a == "--config":
        if i + 1 >= len(argv):
          raise config_lib.ConfigError("--config needs a file path")
        path, i = argv[i + 1], i + 2
      else:
        path, i = a.split("=", 1)[1], i + 1
      continue
    if a.startswith("--config."):
      key = a[len("--config."):]
      if "=" in key:
        key, value = key.split("=", 1)
        i += 1
      else:
        if i + 1 >= len(argv):
          raise config_lib.ConfigError(f"{a} needs a value")
        value, i = argv[i + 1], i + 2
      overrides[key] = value
      continue
    rest.append(a)
    i += 1
  return path, overrides, rest


class ConfigArgs:
  """The config part of a command line: `path`, `overrides` ({"a.b": "V"}) and the remaining arguments `rest`."""

  def __init__(self, argv: list[str]):
    self.path, self.overrides, self.rest = split_config_args(argv)

  def load(self, required: bool = True, hint: str = "see experiments/", **extra: str) -> ConfigDict | None:
    """The validated, locked config (the overrides plus `extra` ones applied), or None when no `--config` was given
    and `required` is False."""
    if self.path is None:
      if required:
        raise config_lib.ConfigError(f"--config FILE is required ({hint})")
      if self.overrides or extra:
        raise config_lib.ConfigError("--config.KEY overrides need --config FILE")
      return None
    return config_lib.load_config(self.path, {**self.overrides, **extra})


def parser(prog: str, doc: str, *, epilog: bool = False) -> argparse.ArgumentParser:
  """An argument parser for `mmada-jax PROG`: the first paragraph of `doc` as its description, and with `epilog`
  the whole of it after the options (kept as written)."""
  return argparse.ArgumentParser(prog=f"mmada-jax {prog}", description=doc.strip().split("\n\n")[0],
                                 epilog=doc if epilog else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
