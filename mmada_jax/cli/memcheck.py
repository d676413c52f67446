"""`mmada-jax memcheck --workdir DIR`: the memory of `mmada-jax convert` on a synthetic official checkpoint.

  mmada-jax memcheck --workdir /tmp/memcheck [--layers 16 --d-model 2048 --mlp 8192 --vocab 100000]

Writes a random bf16 checkpoint in the official layout (sharded, with an index), then runs the import and the export
each in a fresh child process (`mmada-jax convert`) and prints their peak resident memory next to the checkpoint size
and the largest single tensor, plus whether the round trip was byte-identical.
"""

from __future__ import annotations

import filecmp
import os
import resource
import shutil
import subprocess
import sys
import time

from mmada_jax import cli
from mmada_jax.cli import common
from mmada_jax.convert import memcheck, official


def run_child(args: list[str]) -> tuple[float, float]:
  """Runs `mmada-jax ARGS` in a fresh child process; returns (its peak RSS in bytes, seconds)."""
  t0 = time.time()
  res = subprocess.run([sys.executable, "-m", "mmada_jax.cli", "memcheck", "--child", *args], check=True,
                       stdout=subprocess.PIPE, text=True)
  peak = [line for line in res.stdout.splitlines() if line.startswith("PEAK_RSS_KIB ")]
  return int(peak[-1].split()[1]) * 1024.0, time.time() - t0


def child(args: list[str]) -> int:
  rc = cli.main(args)
  print(f"PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
  return rc


def main(argv: list[str]) -> int:
  if argv[:1] == ["--child"]:
    return child(argv[1:])
  p = common.parser("memcheck", __doc__, epilog=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--d-model", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--mlp", type=int, default=8192)
  p.add_argument("--vocab", type=int, default=100000)
  p.add_argument("--shard-gb", type=float, default=1.0)
  p.add_argument("--layout", choices=("stacked", "unstacked"), default="stacked")
  a = p.parse_args(argv)
  if os.path.exists(a.workdir):
    raise SystemExit(f"{a.workdir} exists; give a new directory")
  s = official.Shape(num_layers=a.layers, d_model=a.d_model, num_heads=a.heads, num_kv_heads=a.heads,
                     head_dim=a.d_model // a.heads, mlp_hidden=a.mlp, vocab_size=a.vocab, rope_theta=500000.0,
                     norm_eps=1e-5)
  src, ck, out = (os.path.join(a.workdir, n) for n in ("official", "orbax", "exported"))
  print(f"writing a synthetic bf16 checkpoint to {src} ...", flush=True)
  total, largest = memcheck.write_synthetic(src, s, int(a.shard_gb * 2**30))
  print(f"checkpoint: {total / 2**30:.2f} GiB in {len(os.listdir(src)) - 2} files; largest tensor "
        f"{largest / 2**20:.0f} MiB")
  rss_in, t_in = run_child(["convert", src, ck, "--layout", a.layout])
  rss_out, t_out = run_child(["convert", ck, out])
  same = all(filecmp.cmp(os.path.join(src, n), os.path.join(out, n), shallow=False) for n in os.listdir(src))
  gib = 2**30
  print(f"import ({a.layout}): peak RSS {rss_in / gib:.2f} GiB = checkpoint + {(rss_in - total) / largest:.1f} x "
        f"largest tensor ({t_in:.0f} s)")
  print(f"export:           peak RSS {rss_out / gib:.2f} GiB = checkpoint + {(rss_out - total) / largest:.1f} x "
        f"largest tensor ({t_out:.0f} s)")
  print(f"round trip byte-identical: {same}")
  shutil.rmtree(a.workdir)
  return 0 if same else 1
