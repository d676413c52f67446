"""`mmada-jax export --config FILE --workdir DIR --out CKPT`: writes the parameters of a training run's checkpoint (no
optimizer state) as a parameter checkpoint, for `--params`, `--init_from` or `convert`."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np

from mmada_jax import checkpoint as ckpt, config as config_lib
from mmada_jax.cli import common
from mmada_jax.inference import loading
from mmada_jax.models import llada
from mmada_jax.parallel import partitioning


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  p = common.parser("export", __doc__.split("`: ", 1)[1])
  p.add_argument("--workdir", required=True, help="training run directory")
  p.add_argument("--out", required=True, help="output parameter checkpoint directory (must not exist)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--dtype", choices=config_lib.DTYPES, help="cast the parameters (default: as saved)")
  args = p.parse_args(cfg.rest)
  config = cfg.load()
  if os.path.exists(args.out):
    raise ckpt.CheckpointError(f"--out {args.out} already exists; choose a new path")
  expected = nn.unbox(partitioning.abstract_variables(llada.build_model(config.model))["params"])
  host, info = loading.read_backbone(config, expected, workdir=args.workdir, step=args.step)  # host arrays only
  host = jax.tree.map(lambda x: np.asarray(x).astype(args.dtype or x.dtype), host)
  ckpt.save_params(args.out, host, ckpt.backbone_metadata(config, source=info["source"], step=info["step"]))
  n = sum(int(x.size) for x in jax.tree.leaves(host))
  print(f"exported {n:,} parameters of {info['source']} (step {info['step']}) to {os.path.abspath(args.out)}")
  return 0
