"""`mmada-jax sample`: generate from a checkpoint at the terminal, or time the text sampler.

  mmada-jax sample text  --config FILE (--params CKPT | --workdir DIR) --prompt TEXT [--prompt TEXT ...] [--think]
  mmada-jax sample t2i   --config FILE (--params CKPT | --workdir DIR) [--magvit CKPT] --prompt TEXT [--num_images K]
                         [--out DIR]
  mmada-jax sample mmu   --config FILE (--params CKPT | --workdir DIR) [--magvit CKPT] --image FILE --question TEXT
  mmada-jax sample bench --config FILE [--batch 1,8] [--prompt_len 64] [--gen_length 64] [--block_length 32]
                         [--steps 32] [--variants exact,dual_cache,threshold=0.9] [--repeats 3]

Weights: `--params` is an mmada-jax parameter checkpoint (`mmada-jax convert` of the official weights, or any
`checkpoint.save_params` tree of the backbone); `--workdir` is a training run, whose latest `checkpoints/<step>/state`
(or `--step N`) is read for its parameters only. The MAGVIT-v2 tokenizer (t2i, mmu) is `--magvit` or
`data.image_tokenizer`; its architecture must match the `magvit` config section.

Sampler settings: the config's `sampling.text` (text, mmu) or `sampling.image` (t2i) section, then `--preset NAME`
(the official demo settings, listed by `--help` of each mode), then explicit `--config.sampling.*` overrides and the
sampler flags.

`text` prints the answer block by block as it is generated (one prompt; several prompts are generated as one batch and
printed at the end); `--think` adds the official CoT instruction. `t2i` writes one PNG per image (never over an
existing file). `mmu` encodes the image with MAGVIT and answers the question in the training prompt format (`--format
chat` for the chat template of the official demo).

`bench` (the shared bench workload by default: prompt 64 random tokens, 64 generated, block 32, 32 steps, temperature
0, low-confidence remasking; random weights): one warm-up call, then the median of `--repeats` timed calls. Variants:
`exact` (identical tokens to the official sampler), `dual_cache`, `threshold=P` and combinations joined with `+`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable

import jax
import numpy as np

from mmada_jax import config as config_lib
from mmada_jax.bench import workloads
from mmada_jax.cli import common
from mmada_jax.inference import presets, sampler as sampler_lib
from mmada_jax.inference.errors import InferenceError
from mmada_jax.models import image_io


def _key(seed: int):
  return jax.random.key(int(seed))


def run_text(sampler: sampler_lib.Sampler, prompts: list[str], settings, seed: int, think: bool = False,
             chat: bool = True, out=None) -> list[str]:
  """Generates and prints the answers (to `out`, default stdout); one prompt is printed block by block."""
  out = out or sys.stdout
  ids = [sampler.chat_prompt(p, think=think, chat=chat) for p in prompts]
  shown = [""]

  def show(block: int, answers: np.ndarray) -> None:
    # Held back: a character whose bytes are split across blocks, until the next block completes it.
    text = sampler.answer(answers[0, :(block + 1) * settings.block_length]).rstrip("\ufffd")
    if text.startswith(shown[0]):  # else a [MASK] the model wrote earlier was filled in: the end prints the answer
      out.write(text[len(shown[0]):])
      out.flush()
      shown[0] = text

  t0 = time.perf_counter()
  answers = sampler.generate_text(ids, settings, _key(seed), on_block=show if len(prompts) == 1 else None)
  texts = [sampler.answer(a) for a in answers]
  if len(prompts) == 1:
    rest = texts[0][len(shown[0]):] if texts[0].startswith(shown[0]) else f"\n[final] {texts[0]}"
    out.write(rest + "\n")
  else:
    for i, text in enumerate(texts):
      out.write(f"[{i}] {prompts[i]}\n{text}\n\n")
  out.write(f"({len(prompts)} x {settings.gen_length} positions in {time.perf_counter() - t0:.1f} s)\n")
  out.flush()
  return texts


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def _free_path(directory: str, stem: str) -> str:
  """`directory/stem.png`, or `stem-1.png`, `stem-2.png`, ... when it exists (nothing is overwritten)."""
  path, k = os.path.join(directory, f"{stem}.png"), 0
  while os.path.exists(path):
    k += 1
    path = os.path.join(directory, f"{stem}-{k}.png")
  return path


def run_t2i(sampler: sampler_lib.Sampler, prompts: list[str], settings, seed: int, num_images: int, out_dir: str,
            log: Callable[[str], None] = print) -> list[str]:
  """Generates `num_images` images per prompt (one batch) and writes each as a PNG; returns the paths."""
  for p in prompts:
    if (cut := sampler.text_prefix_overflow(p)) > 0:
      log(f"warning: the last {cut} token(s) of {p!r} do not fit data.max_text_len={sampler.prompter.max_text_len} "
          f"and are cut")
  batch = [p for p in prompts for _ in range(num_images)]
  t0 = time.perf_counter()
  _, images = sampler.generate_images(batch, settings, _key(seed))
  log(f"{len(batch)} image(s), {settings.timesteps} steps, guidance {settings.guidance_scale} in "
      f"{time.perf_counter() - t0:.1f} s")
  paths = []
  for i, (prompt, image) in enumerate(zip(batch, images)):
    paths.append(image_io.save_png(image, _free_path(out_dir, f"{i:02d}_{_slug(prompt)}")))
    log(f"wrote {paths[-1]}")
  return paths


def run_mmu(sampler: sampler_lib.Sampler, image: str, questions: list[str], settings, seed: int,
            think: bool = False, fmt: str = "train", out=None) -> list[str]:
  """Answers each question about one image file; prints question and answer (to `out`, default stdout)."""
  out = out or sys.stdout
  if not os.path.isfile(image):
    raise InferenceError(f"--image {image}: no such file")
  codes = sampler.images.encode([image])[0]
  ids = [sampler.mmu_prompt(codes, q, think=think, fmt=fmt) for q in questions]
  answers = [sampler.answer(a) for a in sampler.generate_text(ids, settings, _key(seed))]
  for q, a in zip(questions, answers):
    out.write(f"Q: {q}\nA: {a}\n")
  out.flush()
  return answers


def _run_bench(config, args) -> int:
  """`sample bench`: the text-generation workload of `mmada-jax bench generate` (mmada_jax/bench/workloads.py)."""
  try:
    variants = workloads.generate_variants(argparse.Namespace(**vars(args), dual_cache=False, threshold=None))
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  workloads.bench_text(config, workloads.parse_batches(args.batch), variants, args)
  return 0


def _weights_args(p: argparse.ArgumentParser, images: bool) -> None:
  p.add_argument("--params", help="mmada-jax parameter checkpoint of the backbone (e.g. converted official weights)")
  p.add_argument("--workdir", help="training run directory: parameters of its latest checkpoint")
  p.add_argument("--step", type=int, help="with --workdir: this checkpoint step instead of the latest")
  p.add_argument("--seed", type=int, help="PRNG seed of the sampler noise (default: config seed)")
  if images:
    p.add_argument("--magvit", help="MAGVIT-v2 parameter checkpoint (default: data.image_tokenizer)")


def _text_flags(p: argparse.ArgumentParser, known: dict) -> None:
  p.add_argument("--preset", help=f"official demo settings: {', '.join(known)}")
  p.add_argument("--gen_length", type=int, help="generated positions G (sampling.text.gen_length)")
  p.add_argument("--block_length", type=int, help="positions per block (sampling.text.block_length)")
  p.add_argument("--steps", type=int, help="model calls in total (sampling.text.steps)")
  p.add_argument("--temperature", type=float, help="Gumbel temperature (sampling.text.temperature)")
  p.add_argument("--think", action="store_true", help="prepend the official CoT instruction (<think> reasoning)")


def _parser() -> argparse.ArgumentParser:
  parser = common.parser("sample", __doc__, epilog=True)
  modes = parser.add_subparsers(dest="mode", required=True)
  text = modes.add_parser("text", help="prompt -> answer, streamed block by block")
  _weights_args(text, images=False)
  _text_flags(text, presets.TEXT_PRESETS)
  text.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
  text.add_argument("--raw", action="store_true", help="no chat template: BOS + the prompt text (base models)")
  t2i = modes.add_parser("t2i", help="prompt -> PNG image(s)")
  _weights_args(t2i, images=True)
  t2i.add_argument("--preset", help=f"official demo settings: {', '.join(presets.IMAGE_PRESETS)}")
  t2i.add_argument("--prompt", action="append", required=True, help="image description (repeat for several)")
  t2i.add_argument("--timesteps", type=int, help="MaskGIT steps (sampling.image.timesteps)")
  t2i.add_argument("--guidance_scale", type=float, help="classifier-free guidance g (sampling.image.guidance_scale)")
  t2i.add_argument("--num_images", type=int, default=1, help="images per prompt")
  t2i.add_argument("--out", default="samples", help="directory of the PNG files (default: ./samples)")
  mmu = modes.add_parser("mmu", help="image + question -> answer")
  _weights_args(mmu, images=True)
  _text_flags(mmu, presets.TEXT_PRESETS)
  mmu.add_argument("--image", required=True, help="image file (any size; resized and centre-cropped)")
  mmu.add_argument("--question", action="append", required=True, help="question (repeat for several)")
  mmu.add_argument("--format", choices=sampler_lib.MMU_FORMATS, default="train",
                   help="prompt text: the training format (default) or the chat template of the official demo")
  bench = modes.add_parser("bench", help="text sampler speed on random weights")
  bench.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  bench.add_argument("--prompt_len", type=int, default=64)
  bench.add_argument("--gen_length", type=int, default=64)
  bench.add_argument("--block_length", type=int, default=32)
  bench.add_argument("--steps", type=int, default=32)
  bench.add_argument("--variants", default="exact", help="comma-separated: exact, dual_cache, threshold=P, a+b")
  bench.add_argument("--repeats", type=int, default=3)
  return parser


def main(argv: list[str]) -> int:
  """Entry point of `mmada-jax sample`; returns the exit status."""
  cfg = common.ConfigArgs(argv)
  args = _parser().parse_args(cfg.rest)
  config = cfg.load(hint="the experiment file the weights were made for")
  overrides = cfg.overrides
  if args.mode == "bench":
    return _run_bench(config, args)
  seed = config.seed if args.seed is None else args.seed
  if args.mode == "t2i":
    settings = presets.image_settings(config, args.preset, presets.explicit_keys(overrides, "image"),
                                      timesteps=args.timesteps, guidance_scale=args.guidance_scale)
    if args.num_images < 1:
      raise InferenceError(f"--num_images must be >= 1, got {args.num_images}")
  else:
    settings = presets.text_settings(config, args.preset, presets.explicit_keys(overrides, "text"),
                                     gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                                     temperature=args.temperature)
  if args.mode == "mmu" and not os.path.isfile(args.image):
    raise InferenceError(f"--image {args.image}: no such file")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  sampler = sampler_lib.Sampler.load(config, params=args.params, workdir=args.workdir, step=args.step,
                                     magvit=getattr(args, "magvit", None), need_images=args.mode != "text", log=log)
  if args.mode == "text":
    run_text(sampler, args.prompt, settings, seed, think=args.think, chat=not args.raw)
  elif args.mode == "t2i":
    run_t2i(sampler, args.prompt, settings, seed, args.num_images, args.out, log=log)
  else:
    run_mmu(sampler, args.image, args.question, settings, seed, think=args.think, fmt=args.format)
  return 0
