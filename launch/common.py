"""Shared pieces of the launch scripts: flags with environment-variable defaults, and a runner with a dry-run mode.

Every flag `--some_flag` of a launch script also reads `MMADA_SOME_FLAG` from the environment (the flag wins), so a
team can keep its project, zone and TPU name in a shell profile. `--dry_run` prints each command, shell-quoted, instead
of running it; nothing else differs between a dry run and a real one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_name(flag: str) -> str:
  """'--accelerator_type' -> 'MMADA_ACCELERATOR_TYPE'."""
  return "MMADA_" + flag.lstrip("-").upper()


def add(parser: argparse.ArgumentParser, flag: str, help: str, default=None, required: bool = False, **kwargs):
  """Adds `flag` whose default comes from its MMADA_* environment variable, else `default`."""
  env = env_name(flag)
  value = os.environ.get(env, default)
  if kwargs.get("type") is not None and value is not None and isinstance(value, str):
    value = kwargs["type"](value)
  suffix = f" (env {env}" + (f"; default {default!r})" if default not in (None, "") else ")")
  parser.add_argument(flag, default=value, required=required and value is None, help=help + suffix, **kwargs)


def add_dry_run(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dry_run", action="store_true", default=os.environ.get("MMADA_DRY_RUN", "") == "1",
                      help="print the commands instead of running them (env MMADA_DRY_RUN=1)")


class Runner:
  """Runs commands one after the other (stopping at the first failure), or only prints them in a dry run."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.commands: list[list[str]] = []

  def __call__(self, cmd: Sequence[str], stdin: str | None = None) -> None:
    cmd = [str(c) for c in cmd]
    self.commands.append(cmd)
    line = shlex.join(cmd) + (" <<'EOF'\n" + stdin + "EOF" if stdin is not None else "")
    print(("" if self.dry_run else "+ ") + line, file=self.out, flush=True)
    if self.dry_run:
      return
    res = subprocess.run(cmd, input=stdin, text=True)
    if res.returncode:
      raise SystemExit(f"command failed with exit status {res.returncode}: {shlex.join(cmd)}")


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `[flags...] -- [command...]` (the command runs on the machines)."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def env_exports(pairs: Sequence[str]) -> str:
  """['A=1', 'B=x y'] -> "export A=1 'B=x y'; " (empty when no pairs); raises on a malformed pair."""
  for pair in pairs:
    name, sep, _ = pair.partition("=")
    if not sep or not name.replace("_", "").isalnum():
      raise SystemExit(f"--env {pair!r}: expected NAME=VALUE")
  return ("export " + " ".join(shlex.quote(p) for p in pairs) + "; ") if pairs else ""
