"""`mmada-jax sample bench`: generation speed of the text sampler on a config's model with random weights.

  mmada-jax sample bench --config experiments/bench.py [--batch 1,8] [--prompt_len 64] [--gen_length 64]
                         [--block_length 32] [--steps 32] [--variants exact,dual_cache,threshold=0.9] [--repeats 3]

The default workload is the one of the official CPU baseline (../shared/fixtures/README.md: prompt 64 random tokens,
64 generated, block 32, 32 steps, temperature 0, low-confidence remasking): one warm-up call (it compiles), then the
median of `--repeats` timed calls, wall clock around the finished result. Variants: `exact` (identical tokens to the
official sampler), `dual_cache`, `threshold=P` and combinations joined with `+` (approximate, see sampling_text).
"""

from __future__ import annotations

import argparse
import statistics
import time

from mmada_jax import config as config_lib


def _settings(variant: str, args) -> "object":
  from mmada_jax.diffusion import sampling_text as st

  extra = {}
  for part in filter(None, variant.split("+")):
    if part == "exact":
      continue
    if part == "dual_cache":
      extra["dual_cache"] = True
    elif part.startswith("threshold="):
      extra["threshold"] = float(part.split("=", 1)[1])
    else:
      raise config_lib.ConfigError(f"--variants: unknown variant {part!r} (exact, dual_cache, threshold=P)")
  return st.TextSampling(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps, **extra)


def bench_text(config, batches: list[int], variants: list[str], args, log=print) -> list[dict]:
  """Times `sampling_text.generate` per batch size and variant; returns one result dict per pair."""
  import jax
  import numpy as np

  from mmada_jax.diffusion import sampling_text as st
  from mmada_jax.models import llada

  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(config.seed))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  log(f"model: {n_params:,} parameters, {config.model.dtype}, devices: {jax.devices()[0].platform} x "
      f"{len(jax.devices())}")
  results = []
  for variant in variants:
    settings = _settings(variant, args)
    for batch in batches:
      prompt = np.random.default_rng(0).integers(0, config.vocab.mask_id, (batch, args.prompt_len))
      run = lambda: jax.block_until_ready(st.generate(model, params, prompt, mask_id=config.vocab.mask_id,
                                                      settings=settings))
      t0 = time.perf_counter()
      out = run()
      first = time.perf_counter() - t0
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
      med, calls = statistics.median(times), int(out["calls"])
      res = {"variant": variant, "batch": batch, "first_call_s": first, "median_s": med, "times_s": times,
             "model_calls": calls, "tokens_per_s": batch * args.gen_length / med, "calls_per_s": calls / med}
      log(f"{variant:>24} batch {batch:>3}: {med:8.3f} s median of {args.repeats} (first call {first:.2f} s), "
          f"{calls} model calls, {res['tokens_per_s']:.1f} tokens/s, {res['calls_per_s']:.2f} forward passes/s")
      results.append(res)
  return results


def main_sample(argv: list[str]) -> int:
  """Entry point of `mmada-jax sample`; returns the exit status."""
  path, overrides, rest = config_lib.split_config_args(argv)
  parser = argparse.ArgumentParser(prog="mmada-jax sample", description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=["bench"])
  parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--gen_length", type=int, default=64)
  parser.add_argument("--block_length", type=int, default=32)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--variants", default="exact", help="comma-separated: exact, dual_cache, threshold=P, a+b")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(rest)
  if path is None:
    raise config_lib.ConfigError("--config FILE is required (e.g. experiments/bench.py)")
  config = config_lib.load_config(path, overrides)
  try:
    batches = [int(b) for b in args.batch.split(",") if b]
  except ValueError:
    raise config_lib.ConfigError(f"--batch must be comma-separated integers, got {args.batch!r}") from None
  try:
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
      _settings(v, args)
  except ValueError as e:
    raise config_lib.ConfigError(f"sampler settings: {e}") from None
  bench_text(config, batches, variants, args)
  return 0


if __name__ == "__main__":
  import sys

  sys.exit(main_sample(sys.argv[1:]))
