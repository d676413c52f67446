"""Timing, memory and throughput helpers shared by the bench workloads.

Every workload is compiled ahead of time (`jit(...).lower(...).compile()`), so the compile time, XLA's memory analysis
and cost analysis come from the same executable that is then timed. Timed runs are wall-clock (`time.perf_counter`)
around one call including `block_until_ready`; the statistics are median / min / max over `repeats` runs after
`warmup` untimed runs.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.train import flops as flops_lib


class BenchError(ValueError):
  """Bad bench input: an unknown workload or variant, a flag that does not apply, an official checkout that is
  missing."""


@dataclasses.dataclass
class Compiled:
  """An AOT-compiled program: `call(*dynamic args)`, compile seconds and XLA's static analyses."""
  call: Callable
  compile_s: float
  memory: dict
  xla_flops: float | None


def compile_aot(jitted, *args, **kwargs) -> Compiled:
  """Lowers and compiles `jitted(*args, **kwargs)` (static arguments as given to the jitted function)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  compile_s = time.perf_counter() - t0
  return Compiled(compiled, compile_s, memory_analysis(compiled), xla_flops(compiled))


def memory_analysis(compiled) -> dict:
  """Bytes from `compiled.memory_analysis()` (arguments, outputs, temporaries, generated code); {} if unavailable."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 — some backends do not implement it
    return {}
  if m is None:
    return {}
  out = {}
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
               "generated_code_size_in_bytes"):
    if hasattr(m, name):
      out[name.replace("_in_bytes", "")] = int(getattr(m, name))
  if out:
    out["peak_estimate"] = (out.get("argument_size", 0) + out.get("output_size", 0) + out.get("temp_size", 0)
                            - out.get("alias_size", 0))
  return out


def xla_flops(compiled) -> float | None:
  """XLA's cost-model FLOPs of one call (loop bodies are counted once, so only a lower bound for loops)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def rss_peak_bytes() -> int:
  """Peak resident set size of this process so far (bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
  """Seconds of `repeats` calls of `fn` (each blocked until ready) after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def stats(times: list[float]) -> dict:
  """median / min / max (seconds) and the individual times."""
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": list(times)}


_PEAK_CACHE: dict = {}


def device_peak(dtype: str = "float32", override_tflops: float = 0.0) -> dict:
  """Peak FLOP/s of the first device: `{"flops_per_s", "source"}`.

  GPU/TPU: the vendor data sheet of the device kind (`train.flops.PEAK_TFLOPS`, dense bf16). CPU: measured, the best
  of a 2048³ matmul in the compute dtype (bf16 operands with fp32 accumulation for bf16, the form the model uses).
  """
  if override_tflops > 0:
    return {"flops_per_s": override_tflops * 1e12, "source": "override"}
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    peak = flops_lib.peak_flops_per_device()
    return {"flops_per_s": peak, "source": f"data sheet ({dev.device_kind}, dense bf16)" if peak else "unknown"}
  key = (dev.device_kind, dtype)
  if key not in _PEAK_CACHE:
    _PEAK_CACHE[key] = flops_lib.measure_matmul_flops(n=2048, repeats=3, dtype=jnp.dtype(dtype))
  return {"flops_per_s": _PEAK_CACHE[key], "source": f"measured {dtype} 2048^3 matmul"}


def throughput(flops_per_call: float | None, median_s: float, peak: dict) -> dict:
  """Achieved FLOP/s and MFU of a call of `flops_per_call` FLOPs taking `median_s`."""
  if not flops_per_call:
    return {}
  achieved = flops_per_call / median_s
  out = {"flops_per_call": flops_per_call, "achieved_flops_per_s": achieved}
  if peak.get("flops_per_s"):
    out["mfu"] = achieved / peak["flops_per_s"]
  return out


def environment() -> dict:
  """Facts that make a figure reproducible: device, JAX version, threads, XLA flags."""
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "numpy": np.__version__, "os_cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def n_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
