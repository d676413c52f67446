"""`mmada-jax toyworld build|check|tokenizer [--config FILE]`: the built-in ToyWorld data set.

`build` writes the ArrayRecord splits (tensorflow-datasets builder); `check` measures the image checkers on truth /
blank / noise / shuffled images; `tokenizer` trains the ToyWorld tokenizer for the config's (toy) vocabulary and saves
tokenizer.json. Without `--config` the base config is used (overrides still apply).
"""

from __future__ import annotations

import json

from mmada_jax import config as config_lib
from mmada_jax.cli import common
from mmada_jax.data import toyworld as tw, toyworld_checkers, toyworld_tfds
from mmada_jax.tokens import vocab as vocab_lib


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  parser = common.parser("toyworld", __doc__, epilog=True)
  parser.add_argument("command", choices=("build", "check", "tokenizer"))
  parser.add_argument("--data_dir", default=None, help="where ArrayRecord files go (default data.data_dir)")
  parser.add_argument("--split", default="test")
  parser.add_argument("--count", type=int, default=500, help="records measured by `check`")
  parser.add_argument("--out", default=None, help="directory for tokenizer.json (`tokenizer`)")
  opts = parser.parse_args(cfg.rest)
  config = cfg.load() if cfg.path else config_lib.apply_overrides(config_lib.get_base_config(), cfg.overrides)
  if opts.command == "build":
    b = toyworld_tfds.builder(config, opts.data_dir)
    b.download_and_prepare()
    print(json.dumps({"data_dir": str(b.data_dir), "source": f"tfds:toy_world/{b.builder_config.name}",
                      "splits": {k: v.num_examples for k, v in b.info.splits.items()}}))
  elif opts.command == "check":
    world = tw.ToyWorld.from_config(config)
    for kind in ("truth", "blank", "noise", "shuffled"):
      scores = toyworld_checkers.measure_accuracy(world, opts.split, opts.count, kind)
      print(json.dumps({"images": kind, "records": opts.count, **{k: round(v, 4) for k, v in scores.items()}}))
  else:
    if not opts.out:
      parser.error("tokenizer needs --out DIR")
    tok = tw.toy_tokenizer(vocab_lib.Vocab.from_config(config.vocab), tw.ToyWorld.from_config(config))
    print(tok.save(opts.out))
  return 0
