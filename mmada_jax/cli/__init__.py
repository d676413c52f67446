"""The `mmada-jax` command line: one module per subcommand, each with `main(argv) -> exit status`.

  mmada-jax demo    --workdir DIR            (ToyWorld end to end on CPU)
  mmada-jax info    --config experiments/mmada_8b.py [--config.model.num_layers=4 ...]
  mmada-jax train   --config experiments/... --workdir DIR [--init_from CKPT] [--config.key=value ...]
  mmada-jax rl      --config experiments/toyworld_rl.py:text --workdir DIR
  mmada-jax sample  text|t2i|mmu|bench --config ... (--params CKPT | --workdir DIR) ...
  mmada-jax eval    --config experiments/toyworld.py:cot (--params CKPT | --workdir DIR)
  mmada-jax compile --config experiments/... --topology v5p-128 [--num_slices 2] [--step rl] [--estimate]
  mmada-jax convert SRC DST [--layout stacked|unstacked] [--config FILE] [--overwrite]
  mmada-jax export  --config ... --workdir DIR --out CKPT [--step N] [--dtype bfloat16]   (a run's parameters alone)
  mmada-jax magvit  --config experiments/magvit_toyworld.py --workdir DIR   (train a MAGVIT-v2 image tokenizer)
  mmada-jax toyworld build|check|tokenizer [--config FILE] [...]
  mmada-jax prepare --config ... --source SPEC --task t2i|mmu --out DIR   (image(+text) -> ArrayRecord token shards)
  mmada-jax bench   train|generate|t2i|rl|magvit [--json] [--config.key=value ...]
  mmada-jax memcheck --workdir DIR           (peak memory of convert on a synthetic checkpoint)

Errors in the input (config, checkpoint, data) print one line naming the problem and exit with status 1;
`MMADA_DEBUG=1` shows the traceback instead. `mmada-jax COMMAND --help` describes each command.
"""

from __future__ import annotations

import importlib
import os
import sys

from mmada_jax import checkpoint, config
from mmada_jax.convert import official, safetensors_io

# Each command is `mmada_jax.cli.<name>.main`, imported only when it runs (`info` need not load what `bench` needs).
COMMANDS = ("demo", "info", "train", "rl", "sample", "eval", "compile", "convert", "export", "magvit", "toyworld",
            "prepare", "bench", "memcheck")
# Bad input: one line naming the problem, exit status 1.
INPUT_ERRORS = (config.ConfigError, checkpoint.CheckpointError, official.ConversionError,
                safetensors_io.SafetensorsError, ValueError)


def main(argv: list[str] | None = None) -> int:
  """Runs `mmada-jax ARGV`; returns the exit status (0 ok, 1 bad input, 2 usage, 3 `compile`: does not fit)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    print("\ncommands: " + ", ".join(COMMANDS))
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"mmada-jax: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
    return 2
  try:
    return importlib.import_module(f"mmada_jax.cli.{name}").main(rest)
  except INPUT_ERRORS as e:
    if os.environ.get("MMADA_DEBUG"):
      raise
    print(f"mmada-jax {name}: error: {e}", file=sys.stderr)
    return 1
