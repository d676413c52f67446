"""`mmada-jax prepare --config FILE --source SPEC --task t2i|mmu --out DIR`: pre-tokenises an image(+text) source into
ArrayRecord shards of token ids (`data.prepare`); rerunning the same command resumes."""

from __future__ import annotations

import os
import sys

from mmada_jax.cli import common
from mmada_jax.data import prepare, sources as src_lib


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  p = common.parser("prepare", "Pre-tokenise an image(+text) source into ArrayRecord shards of token ids (resumable; "
                               "read in training as tokens:DIR).")
  p.add_argument("--source", required=True, help="source spec, e.g. toyworld:cot, images:DIR, wds:GLOB, jsonl:GLOB")
  p.add_argument("--task", required=True, choices=prepare.TASKS, help="the layout the records are for")
  p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
  p.add_argument("--split", default="train", help="split of toyworld / tfds sources (default train)")
  p.add_argument("--shard_size", type=int, default=4096, help="source records per shard")
  p.add_argument("--batch_size", type=int, default=64, help="images per jitted MAGVIT-v2 encoding call")
  p.add_argument("--magvit", default=None, help="MAGVIT-v2 parameter checkpoint (default: data.image_tokenizer)")
  p.add_argument("--limit", type=int, default=0, help="only the first N source records (0 = all)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = p.parse_args(cfg.rest)
  config = cfg.load()
  log = lambda m: print(m, file=sys.stderr, flush=True)
  m = prepare.prepare(config, args.source, args.task, args.out, split=args.split, shard_size=args.shard_size,
                      batch_size=args.batch_size, limit=args.limit, magvit=args.magvit, progress=not args.no_progress,
                      log=log)
  reasons = ", ".join(f"{r}: {n}" for r, n in m["skipped_by_reason"].items())
  manifest = os.path.join(os.path.abspath(args.out), src_lib.TOKENS_MANIFEST)
  print(f"prepared {m['records']} records in {m['num_shards']} shards, {len(m['skipped'])} skipped"
        + (f" ({reasons})" if reasons else "") + f"; manifest {manifest}")
  print(f"train on them with --config.data.{args.task}_sources=tokens:{os.path.abspath(args.out)}")
  return 0
