"""`mmada-jax eval`: ToyWorld held-out accuracy of a checkpoint, per task.

  mmada-jax eval --config experiments/toyworld.py:cot (--params CKPT | --workdir DIR [--step N]) [--magvit CKPT]
                 [--tasks text,mmu,t2i] [--count 200] [--start 0] [--batch_size 16] [--out FILE.json] [--overwrite]

Records `start .. start + count - 1` of the ToyWorld `test` split (its own fixed seed: never seen in training):
  text  the arithmetic word problem. `chat` format (the Mix-CoT training format: CoT instruction in the user turn, the
        answer `<think>work</think>answer`): correct iff `check_answer` accepts the text after `</think>`;
        `text_format` is the fraction of answers with a `<think>...</think>` block. `plain` format (pre-training text
        `There is <caption>. <a> plus <b> is`): correct iff the completion is the number. `auto`: `chat` when the
        config's lm sources include `toyworld:chat`, else `plain`.
  mmu   the visual question about the rendered image, encoded by MAGVIT, in the mmu training format (with the CoT
        instruction when the mmu sources include `toyworld:cot`): `check_answer` on the short answer.
  t2i   the drawing prompt -> image (t2i sampler, MAGVIT decode) -> `check_draw`, the pixel checker of the prompt
        (exact scene for "describe" prompts; count, colour and shape for "count" / "reason" prompts).
Sampler settings: `sampling.text` (text, mmu) and `sampling.image` (t2i) of the config (`--config.sampling.*`).
Default tasks: text, plus mmu and t2i when an image tokenizer is configured (`--magvit` / `data.image_tokenizer`).

Each task also reports its chance baseline on the same records (`chance_baseline`: the most frequent training answer
per operation / question kind; for t2i the true image of another test record).

Output: a table on stdout and, next to `--out` (default WORKDIR/eval/toyworld_step<N>.json, or ./toyworld_eval.json),
the JSON (accuracies, per-kind accuracies, settings, example answers), a markdown table (`.md`) and a PNG grid of the
first generated images (`_t2i.png`). Existing files are never replaced unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import os
import sys

from mmada_jax import config as config_lib
from mmada_jax.cli import common
from mmada_jax.eval import toyworld_eval as te
from mmada_jax.inference import loading
from mmada_jax.inference.sampler import Sampler
from mmada_jax.rl import rewards




def _parser() -> argparse.ArgumentParser:
  p = common.parser("eval", __doc__, epilog=True)
  p.add_argument("--params", help="mmada-jax parameter checkpoint of the backbone")
  p.add_argument("--workdir", help="training run directory: parameters of its latest checkpoint")
  p.add_argument("--step", type=int, help="with --workdir: this checkpoint step instead of the latest")
  p.add_argument("--magvit", help="MAGVIT-v2 parameter checkpoint (default: data.image_tokenizer)")
  p.add_argument("--tasks", help=f"comma-separated subset of {','.join(te.TASKS)} (default: all the checkpoint allows)")
  p.add_argument("--count", type=int, default=200, help="test records per task")
  p.add_argument("--start", type=int, default=0, help="first test record")
  p.add_argument("--batch_size", type=int, default=16, help="rows per sampler call")
  p.add_argument("--text_format", choices=te.TEXT_FORMATS, default="auto", help="prompt format of the text task")
  p.add_argument("--seed", type=int, help="PRNG seed of the sampler noise (default: config seed)")
  p.add_argument("--clip", help="local Hugging Face CLIP directory (Flax weights, needs `transformers`): also report "
                                "the CLIP score of the t2i images against their prompts")
  p.add_argument("--out", help="JSON output path (default: WORKDIR/eval/toyworld_step<N>.json or ./toyworld_eval.json)")
  p.add_argument("--overwrite", action="store_true", help="replace existing output files")
  return p


def _tasks(spec: str | None, config, magvit: str | None) -> tuple[str, ...]:
  have_images = bool(magvit or config.data.image_tokenizer)
  if spec is None:
    return te.TASKS if have_images else ("text",)
  tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
  unknown = [t for t in tasks if t not in te.TASKS]
  if unknown or not tasks:
    raise config_lib.ConfigError(f"--tasks: unknown task(s) {unknown} (known: {', '.join(te.TASKS)})")
  if not have_images and any(t in ("mmu", "t2i") for t in tasks):
    raise config_lib.ConfigError("--tasks mmu / t2i need the image tokenizer: pass --magvit CKPT or "
                                 "--config.data.image_tokenizer=CKPT")
  return tasks


def _outputs(args, sampler_step: int | None) -> dict[str, str]:
  if args.out:
    json_path = args.out
  elif args.workdir:
    json_path = os.path.join(args.workdir, "eval", f"toyworld_step{sampler_step}.json")
  else:
    json_path = "toyworld_eval.json"
  stem = json_path[:-5] if json_path.endswith(".json") else json_path
  return {"json": json_path, "md": stem + ".md", "png": stem + "_t2i.png"}


def _check_free(paths: dict[str, str], overwrite: bool) -> None:
  taken = [p for p in paths.values() if os.path.exists(p)]
  if taken and not overwrite:
    raise config_lib.ConfigError(f"output exists: {', '.join(taken)} (choose --out elsewhere or pass --overwrite)")


def main(argv: list[str]) -> int:
  """Entry point of `mmada-jax eval`; returns the exit status."""
  cfg = common.ConfigArgs(argv)
  args = _parser().parse_args(cfg.rest)
  config = cfg.load(hint="the experiment file the checkpoint was trained with")
  tasks = _tasks(args.tasks, config, args.magvit)
  if args.count < 1 or args.batch_size < 1 or args.start < 0:
    raise config_lib.ConfigError("--count and --batch_size must be >= 1, --start >= 0")
  if (args.params is None) == (args.workdir is None):
    raise config_lib.ConfigError("give the model weights with exactly one of --params CKPT or --workdir DIR")
  step = args.step
  if args.workdir and step is None:
    steps = loading.training_steps(args.workdir)
    step = steps[-1] if steps else None
  outputs = _outputs(args, step)
  _check_free(outputs, args.overwrite)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  sampler = Sampler.load(config, params=args.params, workdir=args.workdir, step=args.step,
                         magvit=args.magvit, need_images=any(t != "text" for t in tasks), log=log)
  clip = None
  if args.clip:
    if "t2i" not in tasks:
      raise config_lib.ConfigError("--clip scores text-to-image samples: add t2i to --tasks")
    clip = rewards.load_clip(args.clip)
  options = te.EvalOptions(tasks=tasks, count=args.count, start=args.start, batch_size=args.batch_size,
                        seed=config.seed if args.seed is None else args.seed, text_format=args.text_format, clip=clip)
  result, grid = te.evaluate(sampler, options, log=log)
  print(te.format_table(result))
  written = te.write_outputs(result, grid, outputs, f"ToyWorld evaluation: {result['checkpoint'].get('source')}")
  log("wrote " + ", ".join(written))
  return 0
