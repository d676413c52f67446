#!/usr/bin/env python3
"""Multislice (or single-slice) TPU training on GKE with xpk (`pip install xpk`): cluster, workload, logs.

  python launch/xpk.py cluster  --cluster mmada --tpu_type v5p-128 --num_slices 2 --zone us-east5-a --reservation R
  python launch/xpk.py workload --cluster mmada --tpu_type v5p-128 --num_slices 2 --zone us-east5-a \\
      --workload stage1-1 -- train --config experiments/mmada_8b_stages.py:1.1 --workdir /mnt/runs/stage1_1
  python launch/xpk.py list | delete --cluster mmada --workload stage1-1 --zone us-east5-a

`workload` builds the container from `--base_docker_image` with this checkout as the script directory (xpk copies it
into the image) and runs `pip install -e '.[tpu]'` before the mmada-jax command, unless `--docker_image` names an image
that already contains the package. xpk starts one container per TPU VM host of every slice; each calls
`jax.distributed.initialize()` through `mmada_jax.parallel.distributed`, and the slices join over DCN.
`--max_restarts` restarts the workload after a failure; rerunning the same workdir resumes from its last checkpoint.
Every flag also reads MMADA_<FLAG> from the environment; `--dry_run` prints the xpk commands instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/xpk.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("action", choices=("cluster", "workload", "list", "delete", "delete_cluster"))
  common.add(p, "--cluster", "GKE cluster name", required=True)
  common.add(p, "--zone", "Cloud zone of the TPUs, e.g. us-east5-a", required=True)
  common.add(p, "--project", "Cloud project (default: gcloud's configured project)", default="")
  common.add(p, "--tpu_type", "slice type, e.g. v5p-128, v5litepod-256, v6e-256 (cluster, workload)", default="")
  common.add(p, "--num_slices", "slices joined over DCN", default=1, type=int)
  common.add(p, "--reservation", "reservation to provision from (cluster; default: --on_demand or --spot)", default="")
  p.add_argument("--spot", action="store_true", help="Spot capacity (cluster)")
  p.add_argument("--on_demand", action="store_true", help="on-demand capacity (cluster)")
  common.add(p, "--workload", "workload name (workload, delete)", default="")
  common.add(p, "--docker_image", "an image with mmada-jax installed (workload)", default="")
  common.add(p, "--base_docker_image", "base image when building from this checkout (workload)",
             default="python:3.11-slim")
  common.add(p, "--source", "checkout copied into the image (workload)", default=common.ROOT)
  common.add(p, "--max_restarts", "restarts after a failure (workload)", default=0, type=int)
  common.add(p, "--priority", "very-low, low, medium, high or very-high (workload)", default="medium")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the job (workload)")
  common.add_dry_run(p)
  return p


def _scope(args) -> list[str]:
  return [f"--cluster={args.cluster}", f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def cluster_command(args) -> list[str]:
  if not args.tpu_type:
    raise SystemExit("cluster needs --tpu_type (e.g. v5p-128)")
  capacity = [bool(args.reservation), args.spot, args.on_demand]
  if sum(capacity) != 1:
    raise SystemExit("cluster: choose exactly one of --reservation R, --spot, --on_demand")
  cap = [f"--reservation={args.reservation}"] if args.reservation else ["--spot"] if args.spot else ["--on-demand"]
  return ["xpk", "cluster", "create", *_scope(args), f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}",
          *cap]


def workload_command(args, command: list[str]) -> list[str]:
  if not (args.tpu_type and args.workload):
    raise SystemExit("workload needs --tpu_type and --workload")
  if not command:
    raise SystemExit("workload: give the mmada-jax command after `--`, e.g. -- train --config experiments/... "
                     "--workdir /mnt/runs/...")
  job = "python3 -m mmada_jax.cli " + shlex.join(command)
  if args.docker_image:
    image = [f"--docker-image={args.docker_image}"]
  else:
    image = [f"--base-docker-image={args.base_docker_image}", f"--script-dir={args.source}"]
    job = "pip install -q -e '.[tpu]' && " + job
  return ["xpk", "workload", "create", *_scope(args), f"--workload={args.workload}", f"--tpu-type={args.tpu_type}",
          f"--num-slices={args.num_slices}", *image, f"--max-restarts={args.max_restarts}",
          f"--priority={args.priority}", f"--command={common.env_exports(args.env)}{job}"]


def main(argv: list[str] | None = None) -> int:
  flags, command = common.split_command(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(flags)
  if args.num_slices < 1:
    raise SystemExit("--num_slices must be >= 1")
  run = common.Runner(args.dry_run)
  if args.action == "cluster":
    run(cluster_command(args))
  elif args.action == "workload":
    run(workload_command(args, command))
  elif args.action == "list":
    run(["xpk", "workload", "list", *_scope(args)])
  elif args.action == "delete":
    if not args.workload:
      raise SystemExit("delete needs --workload")
    run(["xpk", "workload", "delete", *_scope(args), f"--workload={args.workload}"])
  else:
    run(["xpk", "cluster", "delete", *_scope(args)])
  return 0


if __name__ == "__main__":
  sys.exit(main())
