"""`mmada-jax magvit --config FILE --workdir DIR [--eval_only]`: trains a MAGVIT-v2 image tokenizer from scratch
(`train.magvit`; rerunning resumes), then evaluates it on held-out ToyWorld images (PSNR, checker rates) and writes
`DIR/recon.png` (originals next to reconstructions)."""

from __future__ import annotations

import json
import os

from mmada_jax.cli import common
from mmada_jax.convert import magvit as conv
from mmada_jax.train import magvit as magvit_train


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  parser = common.parser("magvit", __doc__)
  parser.add_argument("--workdir", required=True, help="checkpoints (state/, params/) and recon.png go here")
  parser.add_argument("--eval_only", action="store_true", help="evaluate the parameters in WORKDIR/params")
  args = parser.parse_args(cfg.rest)
  config = cfg.load(hint="e.g. experiments/magvit_toyworld.py")
  if args.eval_only:
    params, _ = conv.load_magvit(os.path.join(args.workdir, "params"), config.magvit)
  else:
    params = magvit_train.train(config, args.workdir, log=lambda s: print(s, flush=True))["params"]
  result = magvit_train.evaluate(config, params, out_png=os.path.join(args.workdir, "recon.png"))
  print(json.dumps(result), flush=True)
  return 0
