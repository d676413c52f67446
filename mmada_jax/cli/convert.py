"""`mmada-jax convert SRC DST`: official MMaDA / LLaDA (and MAGVIT-v2) checkpoints to Orbax and back.

The direction is detected from SRC: an official Hugging Face directory (config.json + *.safetensors) or a MAGVIT-v2
weights file is imported into an Orbax parameter checkpoint at DST; an mmada-jax parameter checkpoint is exported to
an official directory at DST.
"""

from __future__ import annotations

import os

from mmada_jax import checkpoint as ckpt
from mmada_jax.cli import common
from mmada_jax.convert import magvit, official, safetensors_io as st


def _parser():
  p = common.parser("convert", __doc__, epilog=True)
  p.add_argument("src", help="official checkpoint directory, or an mmada-jax parameter checkpoint")
  p.add_argument("dst", help="output path (must not exist unless --overwrite)")
  p.add_argument("--layout", choices=("stacked", "unstacked"), default=None,
                 help="layer layout of the imported tree (default: stacked, or unstacked when the config sets "
                      "model.scan_layers=False)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
  p.add_argument("--resize_vocab", type=int, default=0,
                 help="grow the embedding and LM head to this many rows (new rows = mean of the old ones), e.g. "
                      "134656 to start MMaDA stage 1.1 from LLaDA-8B-Instruct")
  return p


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  args = _parser().parse_args(cfg.rest)
  config = cfg.load(required=False)
  src = os.path.abspath(args.src)
  if os.path.isdir(os.path.join(src, "metadata")) and os.path.isdir(os.path.join(src, "params")):
    return _export(src, args, config)
  if is_magvit_source(src):
    magvit.convert_magvit_to_orbax(src, args.dst, config=config.magvit if config else None,
                                   overwrite=args.overwrite)
    return 0
  layout = args.layout or ("stacked" if config is None or config.model.scan_layers else "unstacked")
  official.import_official(src, args.dst, layout=layout, model_config=config.model if config else None,
                           vocab_config=config.vocab if config else None, overwrite=args.overwrite,
                           resize_to=args.resize_vocab)
  return 0


def _export(src: str, args, config) -> int:
  kind = ckpt.read_metadata(src).get("kind")
  if kind == "magvit":
    magvit.export_magvit(src, args.dst, config=config.magvit if config else None, overwrite=args.overwrite)
    return 0
  if kind != official.KIND:
    raise ckpt.CheckpointError(f"{src}: no exporter for checkpoint kind {kind!r}")
  official.export_official(src, args.dst)
  return 0


def is_magvit_source(src: str) -> bool:
  """A MAGVIT-v2 checkpoint (a file, or a directory holding one) has encoder./decoder. keys, not model.transformer."""
  if os.path.isfile(src):
    if src.endswith(".bin"):
      return True  # pytorch_model.bin: only MAGVIT weights are accepted in that format
    keys = list(st.SafetensorsFile(src).tensors)
  elif os.path.isdir(src) and any(n.endswith((".safetensors", ".bin")) for n in os.listdir(src)):
    if not any(n.endswith(".safetensors") for n in os.listdir(src)):
      return True
    keys = st.CheckpointDir(src).keys()
  else:
    return False
  return any(k.startswith("encoder.") for k in keys) and not any(k.startswith("model.") for k in keys)
