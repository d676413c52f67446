"""The `mmada-jax` command line.

  mmada-jax demo    --workdir DIR            (ToyWorld end to end on CPU)
  mmada-jax info    --config experiments/mmada_8b.py [--config.model.num_layers=4 ...]
  mmada-jax train   --config experiments/... --workdir DIR [--init_from CKPT] [--config.key=value ...]
  mmada-jax rl      --config experiments/toyworld_rl.py --workdir DIR
  mmada-jax sample  text|t2i|mmu|bench --config ... (--params CKPT | --workdir DIR) ...
  mmada-jax eval    --config experiments/toyworld.py:cot (--params CKPT | --workdir DIR)
  mmada-jax compile --config experiments/... --topology v5p-128 [--num_slices 2]
  mmada-jax convert SRC DST [--layout stacked|unstacked] [--config FILE] [--overwrite]
  mmada-jax export  --config ... --workdir DIR --out CKPT [--step N] [--dtype bfloat16]   (a run's parameters alone)
  mmada-jax toyworld build|check|tokenizer [--config FILE] [...]
  mmada-jax prepare --config ... --source SPEC --out DIR   (image(+text) -> ArrayRecord shards of token ids)
  mmada-jax bench   train|generate|t2i|rl|magvit [--json] [--config.key=value ...]

`convert` looks at SRC: an official Hugging Face directory (config.json + *.safetensors) is imported into an Orbax
parameter checkpoint at DST; an mmada-jax parameter checkpoint is exported to an official directory at DST.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from mmada_jax import config as config_lib


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
  return argparse.ArgumentParser(prog=f"mmada-jax {prog}", description=description)


def _load(argv: list[str], required: bool = True):
  """Splits `--config FILE --config.a.b=V` from argv; returns (config or None, remaining argv)."""
  path, overrides, rest = config_lib.split_config_args(argv)
  if path is None:
    if required:
      raise config_lib.ConfigError("--config FILE is required (see experiments/)")
    if overrides:
      raise config_lib.ConfigError("--config.KEY overrides need --config FILE")
    return None, rest
  return config_lib.load_config(path, overrides), rest


def cmd_info(argv: list[str]) -> int:
  """Prints the resolved config, the parameter count and bytes per device under the configured mesh."""
  config, rest = _load(argv)
  _parser("info", "Show a config, its parameter count and per-device parameter memory.").parse_args(rest)
  import flax.linen as nn
  import jax
  import numpy as np

  from mmada_jax.models import llada
  from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib

  print(config)
  model = llada.build_model(config.model)
  boxed = partitioning.abstract_variables(model)["params"]
  leaves = jax.tree.leaves(nn.unbox(boxed))
  n_params = sum(int(np.prod(x.shape)) for x in leaves)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset, dict(config.sharding.rule_overrides))
  shardings = partitioning.mesh_shardings(boxed, mesh, rules)
  per_device = 0
  for leaf, sh in zip(leaves, jax.tree.leaves(shardings)):
    per_device += int(np.prod(sh.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  print(f"parameters: {n_params:,} ({config.model.param_dtype})")
  print(f"mesh: {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} device(s), "
        f"preset {config.sharding.preset!r}")
  print(f"parameter bytes per device: {per_device / 2**30:.3f} GiB")
  return 0


def cmd_convert(argv: list[str]) -> int:
  """Official checkpoint <-> mmada-jax parameter checkpoint, direction detected from SRC."""
  config, rest = _load(argv, required=False)
  p = _parser("convert", "Convert official MMaDA/LLaDA (and MAGVIT-v2) checkpoints to Orbax and back.")
  p.add_argument("src", help="official checkpoint directory, or an mmada-jax parameter checkpoint")
  p.add_argument("dst", help="output path (must not exist unless --overwrite)")
  p.add_argument("--layout", choices=("stacked", "unstacked"), default=None,
                 help="layer layout of the imported tree (default: stacked, or unstacked when the config sets "
                      "model.scan_layers=False)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output checkpoint")
  p.add_argument("--resize_vocab", type=int, default=0,
                 help="grow the embedding and LM head to this many rows (new rows = mean of the old ones), e.g. "
                      "134656 to start MMaDA stage 1.1 from LLaDA-8B-Instruct")
  args = p.parse_args(rest)
  from mmada_jax import checkpoint as ckpt
  from mmada_jax.convert import official

  src = os.path.abspath(args.src)
  if os.path.isdir(os.path.join(src, "metadata")) and os.path.isdir(os.path.join(src, "params")):
    kind = ckpt.read_metadata(src).get("kind")
    if kind == "magvit":
      from mmada_jax.convert import magvit

      magvit.export_magvit(src, args.dst, config=config.magvit if config else None, overwrite=args.overwrite)
      return 0
    if kind != official.KIND:
      raise ckpt.CheckpointError(f"{src}: no exporter for checkpoint kind {kind!r}")
    official.export_official(src, args.dst)
    return 0
  layout = args.layout or ("stacked" if config is None or config.model.scan_layers else "unstacked")
  if _is_magvit_source(src):
    from mmada_jax.convert import magvit

    magvit.convert_magvit_to_orbax(src, args.dst, config=config.magvit if config else None,
                                   overwrite=args.overwrite)
    return 0
  official.import_official(src, args.dst, layout=layout, model_config=config.model if config else None,
                           vocab_config=config.vocab if config else None, overwrite=args.overwrite,
                           resize_to=args.resize_vocab)
  return 0


def _is_magvit_source(src: str) -> bool:
  """A MAGVIT-v2 checkpoint (a file, or a directory holding one) has encoder./decoder. keys, not model.transformer."""
  from mmada_jax.convert import safetensors_io as st

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


def cmd_train(argv: list[str]) -> int:
  """Masked-denoising training for any stage config; rerunning the same workdir resumes."""
  path, overrides, rest = config_lib.split_config_args(argv)
  p = _parser("train", "Train (or resume) a run in WORKDIR with an experiment config.")
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, tensorboard/")
  p.add_argument("--init_from", default=None, help="parameter checkpoint to start from (sets train.init_from)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
  args = p.parse_args(rest)
  if path is None:
    raise config_lib.ConfigError("--config FILE is required (see experiments/)")
  if args.init_from:
    overrides["train.init_from"] = args.init_from
  config = config_lib.load_config(path, overrides)
  from mmada_jax.parallel import distributed

  distributed.initialize()  # several hosts (Cloud TPU pod, Slurm, MMADA_COORDINATOR ...): join them; else nothing
  print(config, flush=True)  # the resolved config (also saved as WORKDIR/config.json)
  from mmada_jax.diffusion.losses import Objective
  from mmada_jax.train import data_setup, loop

  run = loop.setup(config, args.workdir, Objective, data_setup.make_data)
  last = loop.train(run, progress=not args.no_progress)
  print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())))
  return 0


def cmd_rl(argv: list[str]) -> int:
  """UniGRPO post-training (rollouts, rewards, the vmapped policy step); rerunning the same workdir resumes."""
  from mmada_jax.parallel import distributed
  from mmada_jax.rl import loop as rl_loop

  distributed.initialize()
  return rl_loop.main_rl(argv)


def cmd_compile(argv: list[str]) -> int:
  """AOT-compiles the train step (or the UniGRPO step) for a TPU topology; exit status 3 when it does not fit in HBM."""
  config, rest = _load(argv)
  p = _parser("compile", "Compile the train step or the UniGRPO step for a Cloud TPU topology from this host (needs "
                         "libtpu) and report per-chip memory, XLA's step-time estimate and MFU. "
                         "Exit status 3: does not fit.")
  p.add_argument("--topology", required=True, help="e.g. v4-32, v5e-16, v5p-128, v6e-256")
  p.add_argument("--num_slices", type=int, default=1, help="multislice: number of slices joined over DCN")
  p.add_argument("--step", choices=("train", "rl"), default="train",
                 help="train: the masked-denoising train step; rl: UniGRPO's policy step and log-prob precompute "
                      "(shapes from the config's rl section)")
  p.add_argument("--estimate", action="store_true",
                 help="also estimate the step time and MFU of the configured depth from XLA's cost model, "
                      "extrapolated from 1- and 2-layer unrolled copies (two more, smaller compiles)")
  args = p.parse_args(rest)
  import json

  import jax

  from mmada_jax.parallel import aot

  devices, chip = aot.tpu_devices(args.topology, args.num_slices)
  print(f"{args.topology} x {args.num_slices} slice(s): {len(devices)} chips ({devices[0].device_kind}), "
        f"{chip.hbm_gib:g} GiB HBM each; preset {config.sharding.preset!r}; {args.step} step", flush=True)
  compile_fn = aot.compile_rl_step if args.step == "rl" else aot.compile_train_step
  try:
    programs, facts = compile_fn(config, devices)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(json.dumps({"fits": False, "error": str(e).splitlines()[0]}))
    print(f"DOES NOT FIT: {str(e).splitlines()[0]}")
    return 3
  reports = [aot.report(program, chip, len(devices)) for program in programs]
  for program, rep in zip(programs, reports):
    print(json.dumps({"mesh": facts["mesh"], **{k: float(f"{v:.5g}") if isinstance(v, float) else v
                                                for k, v in rep.items()}}))
    verdict = "fits" if rep["fits"] else "DOES NOT FIT"
    extra = f", other resident buffers {rep['resident_gib']:.2f}" if rep["resident_gib"] else ""
    print(f"{program.name}: {verdict}: {rep['total_gib']:.2f} of {rep['hbm_gib']:g} GiB per chip (arguments "
          f"{rep['arguments_gib']:.2f}, temporaries {rep['temporaries_gib']:.2f}{extra})")
    if "estimated_mfu" in rep:
      print(f"  XLA cost model: {rep['xla_estimated_step_s']:.3f} s/step, MFU {rep['estimated_mfu']:.1%}")
  if args.estimate:
    for est in aot.extrapolated_estimate(config, devices, args.step, programs, chip):
      print(json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in est.items()}))
      if "estimated_mfu" in est:
        print(f"{est['program']}: XLA cost model extrapolated to {config.model.num_layers} layers: "
              f"{est['extrapolated_step_s']:.3f} s/step, MFU {est['estimated_mfu']:.1%} (an optimistic bound: "
              "XLA's estimate of an ideal schedule, not a measurement)")
      else:
        print(f"{est['program']}: no estimate (its unrolled copies still loop)")
  elif "estimated_mfu" not in reports[0]:
    print("XLA's cost model counts a loop body once; for a step-time / MFU estimate of the configured depth add "
          "--estimate")
  return 0 if all(rep["fits"] for rep in reports) else 3


def cmd_sample(argv: list[str]) -> int:
  """Sampling: `text` (prompt -> answer, streamed), `t2i` (prompt -> PNG), `mmu` (image + question -> answer),
  `bench` (text generation speed)."""
  from mmada_jax.diffusion import sample_cli

  return sample_cli.main_sample(argv)


def cmd_eval(argv: list[str]) -> int:
  """ToyWorld held-out accuracies per task (text reasoning, visual questions, text-to-image via the image checker)."""
  from mmada_jax.eval import toyworld_eval

  return toyworld_eval.main_eval(argv)


def cmd_demo(argv: list[str]) -> int:
  """The ToyWorld pipeline end to end: image tokenizer, stage 1 pre-training, Mix-CoT."""
  from mmada_jax import demo

  return demo.main(argv)


def cmd_export(argv: list[str]) -> int:
  """Writes the parameters of a training run's checkpoint (no optimizer state) as a parameter checkpoint, for
  `--params`, `--init_from` or `convert`."""
  config, rest = _load(argv)
  p = _parser("export", cmd_export.__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="training run directory")
  p.add_argument("--out", required=True, help="output parameter checkpoint directory (must not exist)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--dtype", choices=config_lib.DTYPES, help="cast the parameters (default: as saved)")
  args = p.parse_args(rest)
  import flax.linen as nn
  import jax
  import numpy as np

  from mmada_jax import checkpoint as ckpt
  from mmada_jax.diffusion import sample_cli
  from mmada_jax.models import llada
  from mmada_jax.parallel import partitioning

  if os.path.exists(args.out):
    raise ckpt.CheckpointError(f"--out {args.out} already exists; choose a new path")
  expected = nn.unbox(partitioning.abstract_variables(llada.build_model(config.model))["params"])
  host, info = sample_cli.read_backbone(config, expected, workdir=args.workdir, step=args.step)  # host arrays only
  host = jax.tree.map(lambda x: np.asarray(x).astype(args.dtype or x.dtype), host)
  ckpt.save_params(args.out, host, ckpt.backbone_metadata(config, source=info["source"], step=info["step"]))
  n = sum(int(x.size) for x in jax.tree.leaves(host))
  print(f"exported {n:,} parameters of {info['source']} (step {info['step']}) to {os.path.abspath(args.out)}")
  return 0


def cmd_prepare(argv: list[str]) -> int:
  """Pre-tokenises an image(+text) source into ArrayRecord shards of token ids (resumable, with a manifest)."""
  from mmada_jax.data import prepare

  return prepare.main_prepare(argv)


def cmd_bench(argv: list[str]) -> int:
  """Benchmarks: train, generate, t2i, rl, magvit (median/min/max, compile time, tokens/s, FLOP/s, MFU, memory)."""
  from mmada_jax.bench import cli as bench_cli

  return bench_cli.main_bench(argv)


def cmd_toyworld(argv: list[str]) -> int:
  """ToyWorld data set: `build` (ArrayRecord splits), `check` (image checker accuracy), `tokenizer`."""
  from mmada_jax.data import toyworld_tfds

  return toyworld_tfds.main_toyworld(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"info": cmd_info, "convert": cmd_convert, "train": cmd_train,
                                                    "rl": cmd_rl, "compile": cmd_compile, "sample": cmd_sample, "eval": cmd_eval,
                                                    "toyworld": cmd_toyworld, "demo": cmd_demo,
                                                    "prepare": cmd_prepare, "bench": cmd_bench, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__.strip())
    print("\ncommands: " + ", ".join(COMMANDS))
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"mmada-jax: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
    return 2
  from mmada_jax.checkpoint import CheckpointError
  from mmada_jax.convert.official import ConversionError
  from mmada_jax.convert.safetensors_io import SafetensorsError

  try:
    return COMMANDS[name](rest)
  except (config_lib.ConfigError, CheckpointError, ConversionError, SafetensorsError, ValueError) as e:
    if os.environ.get("MMADA_DEBUG"):
      raise
    print(f"mmada-jax {name}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
