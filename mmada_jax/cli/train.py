"""`mmada-jax train --config FILE --workdir DIR [--init_from CKPT]`: masked-denoising training for any stage config;
rerunning the same workdir resumes."""

from __future__ import annotations

from mmada_jax.cli import common
from mmada_jax.diffusion.losses import Objective
from mmada_jax.parallel import distributed
from mmada_jax.train import data_setup, loop


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  p = common.parser("train", "Train (or resume) a run in WORKDIR with an experiment config.")
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, tensorboard/")
  p.add_argument("--init_from", default=None, help="parameter checkpoint to start from (sets train.init_from)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
  args = p.parse_args(cfg.rest)
  config = cfg.load(**({"train.init_from": args.init_from} if args.init_from else {}))
  distributed.initialize()  # several hosts (Cloud TPU pod, Slurm, MMADA_COORDINATOR ...): join them; else nothing
  print(config, flush=True)  # the resolved config (also saved as WORKDIR/config.json)
  run = loop.setup(config, args.workdir, Objective, data_setup.make_data)
  last = loop.train(run, progress=not args.no_progress)
  print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0
