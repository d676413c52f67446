"""`mmada-jax rl --config FILE --workdir DIR [--init_from CKPT]`: UniGRPO post-training (rollouts, rewards, the
vmapped policy step); rerunning the same workdir resumes."""

from __future__ import annotations

from mmada_jax.cli import common
from mmada_jax.parallel import distributed
from mmada_jax.rl import loop as rl_loop
from mmada_jax.rl.programs import ProgramCache


def main(argv: list[str], cache: ProgramCache | None = None) -> int:
  """`cache`: compiled RL programs shared with other runs of this process (tests); None compiles this run's own."""
  cfg = common.ConfigArgs(argv)
  p = common.parser("rl", "UniGRPO reinforcement learning (or resume a run in WORKDIR) with an experiment config.")
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, samples.jsonl")
  p.add_argument("--init_from", default=None, help="parameter checkpoint of the starting policy and reference (sets "
                                                   "train.init_from)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = p.parse_args(cfg.rest)
  config = cfg.load(hint="e.g. experiments/toyworld_rl.py:text",
                    **({"train.init_from": args.init_from} if args.init_from else {}))
  distributed.initialize()
  print(config, flush=True)
  run = rl_loop.setup(config, args.workdir, cache=cache)
  last = rl_loop.train(run, progress=not args.no_progress)
  print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0
