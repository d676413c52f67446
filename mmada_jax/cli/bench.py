"""`mmada-jax bench`: timed workloads with random weights, optionally side by side with the official PyTorch code.

  mmada-jax bench WORKLOAD [--json] [--repeats N] [--warmup N] [--config FILE] [--config.key=value ...]
                  [--official DIR [--official_python PY] [--rounds R]]

Workloads (default config in brackets):
  train     the masked-denoising train step on the fixtures' batch: batch 8 x 256, one lm row per sequence, loss
            Σ masked CE / p_mask ÷ (B·L) (loss.coeff_lm = 1), AdamW at optimizer.learning_rate from step 0 without
            clipping [experiments/bench.py]; --batch_size, --seq_len
  generate  text generation: 64-token random prompt, 64 tokens, block 32, 32 steps, batch 1 and 8
            [experiments/bench.py]; --batch 1,8 --prompt_len --gen_length --block_length --steps, --variants
            exact,dual_cache,threshold=P,bf16 (joined with + to combine, e.g. dual_cache+bf16), or --dual_cache /
            --threshold P
  t2i       text-to-image MaskGIT generation with the config's sampling.image settings (15 steps, guidance 3.5 by
            default) [experiments/bench.py]; --batch 1
  rl        the UniGRPO policy step and its old/reference log-prob precompute; small rl section by default (2 prompts
            x 4 responses, 64 + 64 tokens, mu = 2) [experiments/bench.py]
  magvit    MAGVIT-v2 encode and decode [experiments/magvit_toyworld.py]; --batch 1

Reported per case: median / min / max over --repeats timed calls after --warmup untimed calls (compilation is done
before, ahead of time, and reported as compile_s), tokens/s (or images/s), achieved FLOP/s and MFU (analytic model
FLOPs, train/flops.py; the peak is a measured 2048³ matmul in the compute dtype on CPU, the data sheet's dense bf16
figure on GPU/TPU, or --config.train.peak_tflops), XLA's compiled memory analysis and the process's peak RSS.

The bench runs on the first JAX device. On CPU, run it without `--xla_force_host_platform_device_count` (the tests'
8 fake devices): XLA then uses every core for one device, as the official PyTorch code does.

--official DIR (train, generate): a checkout of Gen-Verse/MMaDA (commit 3cdb8709 for the shared fixtures), imported
at run time by a separate Python with torch (--official_python, default $MMADA_OFFICIAL_PYTHON or python3). The
official model gets our random weights and the same inputs; rounds alternate ours / official (--rounds, default 2)
and the speed-up official / ours is printed (and, for generate, how many tokens are identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from mmada_jax import config as config_lib
from mmada_jax.bench import common, workloads
from mmada_jax.bench.common import BenchError
from mmada_jax.cli import common as cli_common

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "experiments")
DEFAULT_CONFIG = {"train": "bench.py", "generate": "bench.py", "t2i": "bench.py", "rl": "bench.py",
                  "magvit": "magvit_toyworld.py"}
# Workload defaults applied under the command line's --config.* overrides.
DEFAULT_OVERRIDES = {
    # The fixtures' train step: the lm loss alone at weight 1, AdamW at its peak rate from step 0, no clipping.
    "train": {"loss.coeff_lm": "1.0", "optimizer.schedule": "constant", "optimizer.warmup_steps": "0",
              "optimizer.grad_clip": "0.0"},
    "rl": {"rl.prompts_per_step": "2", "rl.group_size": "4", "rl.prompt_len": "64", "rl.gen_length": "64",
           "rl.inner_steps": "2"},
}
DEFAULT_REPEATS = {"train": (10, 3), "generate": (3, 1), "t2i": (3, 1), "rl": (5, 2), "magvit": (5, 1)}
OFFICIAL_WORKLOADS = ("train", "generate")


def _parser() -> argparse.ArgumentParser:
  p = cli_common.parser("bench", __doc__, epilog=True)
  p.add_argument("workload", choices=sorted(workloads.WORKLOADS))
  p.add_argument("--json", action="store_true", help="print one JSON object (the log goes to stderr)")
  p.add_argument("--repeats", type=int, help="timed calls per round (default: train 10, rl 5, magvit 5, others 3)")
  p.add_argument("--warmup", type=int, help="untimed calls before the timed ones (default: train 3, rl 2, others 1)")
  p.add_argument("--batch", help="generate / t2i / magvit: comma-separated batch sizes")
  p.add_argument("--batch_size", type=int, default=8, help="train: rows")
  p.add_argument("--seq_len", type=int, default=256, help="train: sequence length")
  p.add_argument("--prompt_len", type=int, default=64, help="generate: random prompt tokens")
  p.add_argument("--gen_length", type=int, default=64, help="generate: generated positions")
  p.add_argument("--block_length", type=int, default=32, help="generate: positions per block")
  p.add_argument("--steps", type=int, default=32, help="generate: model calls in total (exact schedule)")
  p.add_argument("--variants", default="exact",
                 help="generate: comma-separated exact, dual_cache, threshold=P, bf16, a+b")
  p.add_argument("--dual_cache", action="store_true", help="generate: add the dual_cache variant (approximate)")
  p.add_argument("--threshold", type=float, help="generate: add the confidence-threshold variant (approximate)")
  p.add_argument("--official", help="checkout of Gen-Verse/MMaDA to time side by side (train, generate)")
  p.add_argument("--official_python", help="Python with torch for the official code (default $MMADA_OFFICIAL_PYTHON "
                                           "or python3)")
  p.add_argument("--rounds", type=int, default=2, help="with --official: alternating rounds ours / official")
  p.add_argument("--threads", type=int, default=0, help="with --official: torch threads (0 = torch's default)")
  p.add_argument("--profile", help="write a jax.profiler trace of the timed calls to this directory")
  return p


def _load(args, path: str | None, overrides: dict[str, str]):
  path = path or os.path.join(EXPERIMENTS, DEFAULT_CONFIG[args.workload])
  if not os.path.isfile(path.rsplit(":", 1)[0]) and not os.path.isfile(path):
    raise BenchError(f"--config {path}: no such file (pass --config FILE)")
  merged = dict(DEFAULT_OVERRIDES.get(args.workload, {}))
  merged.update(overrides)
  return config_lib.load_config(path, merged), path


def run(argv: list[str], log=None) -> dict:
  """Runs one workload; returns the report (what --json prints)."""
  path, overrides, rest = cli_common.split_config_args(argv)
  args = _parser().parse_args(rest)
  log = log or (lambda msg: print(msg, file=sys.stderr if args.json else sys.stdout, flush=True))
  repeats, warmup = DEFAULT_REPEATS[args.workload]
  args.repeats = repeats if args.repeats is None else args.repeats
  args.warmup = warmup if args.warmup is None else args.warmup
  if args.repeats < 1 or args.warmup < 0:
    raise BenchError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
  if args.official and args.workload not in OFFICIAL_WORKLOADS:
    raise BenchError(f"--official applies to {', '.join(OFFICIAL_WORKLOADS)}, not {args.workload!r}")
  config, path = _load(args, path, overrides)
  env = common.environment()
  if env["platform"] == "cpu" and env["device_count"] > 1:
    log(f"note: {env['device_count']} CPU devices (XLA_FLAGS={env['xla_flags']!r}); the bench uses the first one")
  fn = workloads.WORKLOADS[args.workload]
  if args.profile:
    with jax.profiler.trace(args.profile):
      report = fn(config, args, log)
  else:
    report = fn(config, args, log)
  report = {"workload": args.workload, "config": path, "overrides": overrides, "dtype": str(config.model.dtype),
            "repeats": args.repeats, "warmup": args.warmup, **report, "rss_peak_bytes": common.rss_peak_bytes(),
            "env": env}
  return report


def _summary(report: dict) -> str:
  lines = []
  peak = report.get("peak", {})
  if peak.get("flops_per_s"):
    lines.append(f"peak: {peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['source']})")
  for c in report["cases"]:
    line = (f"{c['name']}: median {c['median_s']:.4f} s (min {c['min_s']:.4f}, max {c['max_s']:.4f}), compile "
            f"{c['compile_s']:.1f} s")
    if "tokens_per_s" in c:
      line += f", {c['tokens_per_s']:.1f} tokens/s"
    if "achieved_flops_per_s" in c:
      line += f", {c['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"
    if "mfu" in c:
      line += f", MFU {c['mfu']:.1%}"
    if c.get("memory", {}).get("peak_estimate"):
      line += f", XLA memory {c['memory']['peak_estimate'] / 2**20:.0f} MiB"
    if "official" in c:
      o = c["official"]
      line += f"; official {o['official_median_s']:.4f} s -> {o['speedup']:.2f}x"
    lines.append(line)
  lines.append(f"process peak RSS {report['rss_peak_bytes'] / 2**20:.0f} MiB")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """Entry point of `mmada-jax bench`; returns the exit status."""
  report = run(argv)
  if "--json" in argv:
    print(json.dumps(report, default=float))
  else:
    print(_summary(report))
  return 0
