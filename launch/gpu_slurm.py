#!/usr/bin/env python3
"""Multi-node GPU training with Slurm: one JAX process per node, all GPUs of the node local to it.

  python launch/gpu_slurm.py --nodes 4 --gpus_per_node 8 --partition a3 --time 24:00:00 \\
      -- train --config experiments/mmada_8b_stages.py:1.1 --workdir /shared/runs/stage1_1

writes a batch script and submits it with `sbatch` (`--dry_run` prints the script instead; `--script FILE` keeps a
copy). Inside the allocation the script sets the coordinator for `jax.distributed` (mmada_jax.parallel.distributed):
MMADA_COORDINATOR = first node of the job : --port, MMADA_NUM_PROCESSES = number of nodes, and per task
MMADA_PROCESS_ID = SLURM_PROCID; `srun --kill-on-bad-exit=1` starts the tasks, so that one failing task ends the job
instead of leaving the others waiting at a barrier. The package must be installed on every node (`pip install -e
'.[gpu]'` in --venv on a shared file system). Every flag also reads MMADA_<FLAG> from the environment.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/gpu_slurm.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  common.add(p, "--nodes", "number of nodes (one JAX process each)", default=2, type=int)
  common.add(p, "--gpus_per_node", "GPUs per node", default=8, type=int)
  common.add(p, "--partition", "Slurm partition (default: the cluster's)", default="")
  common.add(p, "--account", "Slurm account", default="")
  common.add(p, "--time", "time limit, e.g. 24:00:00", default="")
  common.add(p, "--job", "job name", default="mmada")
  common.add(p, "--port", "coordinator port on the first node", default=12355, type=int)
  common.add(p, "--venv", "virtual environment with mmada-jax[gpu] on every node",
             default=os.path.join(common.ROOT, ".venv"))
  common.add(p, "--workdir", "directory the tasks start in (the checkout)", default=common.ROOT)
  common.add(p, "--logs", "directory of the Slurm output files", default="logs")
  common.add(p, "--script", "also write the batch script to this file", default="")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the job")
  common.add_dry_run(p)
  return p


def batch_script(args, command: list[str]) -> str:
  """The sbatch script: resources, coordinator variables, and the srun line."""
  if not command:
    raise SystemExit("give the mmada-jax command after `--`, e.g. -- train --config experiments/... --workdir DIR")
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise SystemExit("--nodes and --gpus_per_node must be >= 1")
  head = ["#!/bin/bash", f"#SBATCH --job-name={args.job}", f"#SBATCH --nodes={args.nodes}",
          "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={args.gpus_per_node}", "#SBATCH --exclusive",
          f"#SBATCH --output={args.logs}/%x-%j.out"]
  head += [f"#SBATCH --{k}={v}" for k, v in (("partition", args.partition), ("account", args.account),
                                             ("time", args.time)) if v]
  task = (f"export MMADA_PROCESS_ID=$SLURM_PROCID; exec {shlex.quote(os.path.join(args.venv, 'bin', 'python'))} "
          f"-m mmada_jax.cli {shlex.join(command)}")
  body = ["set -euo pipefail", f"cd {shlex.quote(args.workdir)}",
          'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
          f'export MMADA_COORDINATOR="$head_node:{args.port}"', 'export MMADA_NUM_PROCESSES="$SLURM_NNODES"',
          "export MMADA_DISTRIBUTED_TIMEOUT=${MMADA_DISTRIBUTED_TIMEOUT:-600}"]
  body += [f"export {shlex.quote(pair)}" for pair in args.env if common.env_exports([pair])]
  body.append(f"srun --kill-on-bad-exit=1 --ntasks={args.nodes} --ntasks-per-node=1 bash -c {shlex.quote(task)}")
  return "\n".join(head + [""] + body) + "\n"


def main(argv: list[str] | None = None) -> int:
  flags, command = common.split_command(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(flags)
  script = batch_script(args, command)
  if args.script:
    with open(args.script, "w") as f:
      f.write(script)
  run = common.Runner(args.dry_run)
  if not args.dry_run:
    os.makedirs(args.logs, exist_ok=True)
  run(["sbatch"], stdin=script)
  return 0


if __name__ == "__main__":
  sys.exit(main())
