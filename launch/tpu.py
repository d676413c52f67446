#!/usr/bin/env python3
"""Cloud TPU VMs: create a slice (or a multislice), set up every worker, run mmada-jax on all workers, fetch logs.

  python launch/tpu.py create --name mmada --zone us-east5-a --accelerator_type v5p-64 [--num_slices 2] [--spot]
  python launch/tpu.py setup  --name mmada --zone us-east5-a            # copy this checkout, pip install -e '.[tpu]'
  python launch/tpu.py run    --name mmada --zone us-east5-a -- train --config experiments/mmada_8b_stages.py:1.1 \\
      --workdir /mnt/runs/stage1_1
  python launch/tpu.py logs   --name mmada --zone us-east5-a --out logs/  # one file per worker
  python launch/tpu.py status | stop | delete --name mmada --zone us-east5-a

With `--num_slices N > 1` (multislice) or `--queued`, the slice is requested as a queued resource (the Cloud TPU docs
recommend queued resources; multislice requires them): `queued-resources create --node-count N --node-prefix NAME`
gives nodes NAME-0 ... NAME-{N-1} that the TPU runtime joins over DCN, and every ssh/scp goes to all nodes and all
workers (`--node=all --worker=all`). Without, `tpu-vm create` makes one slice immediately or fails.

Every worker runs the same command; `mmada_jax.parallel.distributed` then calls `jax.distributed.initialize()`, which
finds the other workers (and slices) itself on Cloud TPU. `run` starts the job detached (nohup) with its output in
~/mmada-logs/<job>.log on each worker, so that it survives the ssh session; `--attach` runs it in the foreground.
Every flag also reads MMADA_<FLAG> from the environment; `--dry_run` prints the gcloud commands instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# TPU software versions for JAX per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/mmada-jax"
REMOTE_VENV = "~/mmada-venv"
REMOTE_LOGS = "~/mmada-logs"
ARCHIVE = "mmada-jax-src.tar.gz"


def runtime_version(accelerator_type: str) -> str:
  gen = accelerator_type.split("-")[0]
  if gen not in RUNTIME_VERSIONS:
    raise SystemExit(f"--accelerator_type {accelerator_type!r}: unknown generation {gen!r} "
                     f"(known: {sorted(RUNTIME_VERSIONS)}); pass --runtime_version explicitly")
  return RUNTIME_VERSIONS[gen]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("action", choices=("create", "status", "setup", "run", "logs", "stop", "delete"))
  common.add(p, "--name", "TPU VM / queued resource name (multislice nodes are NAME-0, NAME-1, ...)", required=True)
  common.add(p, "--zone", "Cloud zone, e.g. us-east5-a", required=True)
  common.add(p, "--project", "Cloud project (default: gcloud's configured project)", default="")
  common.add(p, "--accelerator_type", "slice type, e.g. v5p-64, v5litepod-256, v6e-256, v4-128 (create)", default="")
  common.add(p, "--runtime_version", "TPU software version (default: the JAX one of the generation)", default="")
  common.add(p, "--num_slices", "slices joined over DCN (> 1: multislice, a queued resource)", default=1, type=int)
  p.add_argument("--queued", action="store_true", help="request a single slice as a queued resource too")
  p.add_argument("--spot", action="store_true", help="Spot capacity (create)")
  p.add_argument("--reserved", action="store_true", help="use the project's reservation (create)")
  common.add(p, "--source", "local checkout copied to the workers (setup)", default=common.ROOT)
  common.add(p, "--extras", "pip extras installed on the workers (setup)", default="tpu")
  common.add(p, "--job", "job name: the log file ~/mmada-logs/<job>.log (run, logs)", default="mmada")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the job (run)")
  p.add_argument("--attach", action="store_true", help="run in the foreground instead of detached (run)")
  common.add(p, "--out", "local directory for the fetched logs (logs)", default="logs")
  common.add_dry_run(p)
  return p


class Tpu:
  """The gcloud command lines for one TPU VM slice or queued resource."""

  def __init__(self, args):
    self.args = args
    self.queued = args.queued or args.num_slices > 1

  def _scope(self) -> list[str]:
    out = [f"--zone={self.args.zone}"]
    return out + ([f"--project={self.args.project}"] if self.args.project else [])

  def _group(self) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources" if self.queued else "tpu-vm"]

  def _all(self) -> list[str]:
    return ["--worker=all", "--node=all"] if self.queued else ["--worker=all"]

  def create(self) -> list[str]:
    a = self.args
    if not a.accelerator_type:
      raise SystemExit("create needs --accelerator_type (e.g. v5p-64)")
    if a.spot and a.reserved:
      raise SystemExit("--spot and --reserved exclude each other")
    version = a.runtime_version or runtime_version(a.accelerator_type)
    capacity = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
    if not self.queued:
      return self._group() + ["create", a.name, *self._scope(), f"--accelerator-type={a.accelerator_type}",
                              f"--version={version}", *capacity]
    nodes = ([f"--node-count={a.num_slices}", f"--node-prefix={a.name}"] if a.num_slices > 1
             else [f"--node-id={a.name}"])
    return self._group() + ["create", a.name, *self._scope(), f"--accelerator-type={a.accelerator_type}",
                            f"--runtime-version={version}", *nodes, *capacity]

  def simple(self, verb: str) -> list[str]:
    extra = ["--quiet"] if verb == "delete" else []
    if verb == "delete" and self.queued:
      extra.append("--force")  # deletes the slices of the queued resource with it
    return self._group() + [verb, self.args.name, *self._scope(), *extra]

  def ssh(self, command: str, output_dir: str | None = None) -> list[str]:
    out = [f"--output-directory={output_dir}"] if output_dir else []
    return self._group() + ["ssh", self.args.name, *self._scope(), *self._all(), f"--command={command}", *out]

  def scp_to_all(self, local: str, remote: str) -> list[str]:
    return self._group() + ["scp", local, f"{self.args.name}:{remote}", *self._scope(), *self._all()]


def setup_commands(args, tpu: Tpu) -> list[tuple[list[str], str | None]]:
  """Pack this checkout (no .git, no virtual environments), copy it to every worker, install it in a venv there."""
  archive = os.path.join("/tmp", ARCHIVE)
  pack = ["tar", "-czf", archive, "--exclude=.git", "--exclude=.venv", "--exclude=.ci-venv", "--exclude=*.egg-info",
          "--exclude=__pycache__", "-C", args.source, "."]
  install = (f"set -e; mkdir -p {REMOTE_DIR} {REMOTE_LOGS}; tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR}; "
             f"python3 -m venv {REMOTE_VENV}; {REMOTE_VENV}/bin/pip install -q -U pip; "
             f"{REMOTE_VENV}/bin/pip install -q -e \"{REMOTE_DIR}[{args.extras}]\"; "
             f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.devices())'")
  return [(pack, None), (tpu.scp_to_all(archive, "~/"), None), (tpu.ssh(install), None)]


def run_command(args, command: list[str]) -> str:
  """The shell line every worker runs: the mmada-jax command, detached with its log, unless --attach."""
  if not command:
    raise SystemExit("run: give the mmada-jax command after `--`, e.g. -- train --config experiments/... "
                     "--workdir /mnt/runs/...")
  job = f"{common.env_exports(args.env)}cd {REMOTE_DIR} && {REMOTE_VENV}/bin/python -m mmada_jax.cli " + \
      shlex.join(command)
  if args.attach:
    return job
  log = f"{REMOTE_LOGS}/{args.job}.log"
  return f"mkdir -p {REMOTE_LOGS}; nohup bash -c {shlex.quote(job)} > {log} 2>&1 < /dev/null &"


def main(argv: list[str] | None = None) -> int:
  flags, command = common.split_command(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(flags)
  if args.num_slices < 1:
    raise SystemExit("--num_slices must be >= 1")
  tpu, run = Tpu(args), common.Runner(args.dry_run)
  if args.action == "create":
    run(tpu.create())
  elif args.action in ("status", "stop", "delete"):
    if args.action == "stop" and tpu.queued:
      raise SystemExit("queued resources cannot be stopped, only deleted")
    run(tpu.simple("describe" if args.action == "status" else args.action))
  elif args.action == "setup":
    for cmd, stdin in setup_commands(args, tpu):
      run(cmd, stdin)
  elif args.action == "run":
    run(tpu.ssh(run_command(args, command)))
  elif args.action == "logs":
    run(["mkdir", "-p", args.out])
    run(tpu.ssh(f"cat {REMOTE_LOGS}/{args.job}.log", output_dir=args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
