"""Analytic FLOP counts and peak device throughput for MFU estimates.

Convention (stated because MFU figures are not comparable otherwise): a multiply-add is 2 FLOPs; attention is
bidirectional and counted in full, 4·L²·d per layer per sequence forward (QKᵀ and AV); the LM head is counted at the
positions given (the train loop passes every position: model FLOPs, as if the head ran everywhere, although the loss
evaluates it at the masked positions only — so the MFU is comparable with stacks that do not save that work); a
training step is 3× the forward (forward + 2× for the backward).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from mmada_jax.config import head_dim

# Dense bf16 peak per chip / GPU (vendor data sheets), TFLOP/s.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0,
    "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def per_token_flops(model_config) -> float:
  """FLOPs of the blocks' projections and MLPs for one token (attention scores and the head excluded)."""
  m = model_config
  attn_proj = 2 * m.d_model * head_dim(m) * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, out: heads; k, v: kv heads
  mlp = 2 * 3 * m.d_model * m.mlp_hidden
  return float(m.num_layers * (attn_proj + mlp))


def forward_flops(model_config, length: int, head_positions: float) -> float:
  """FLOPs of one forward pass over one sequence of `length` tokens with the head at `head_positions` positions."""
  m = model_config
  attention = m.num_layers * 4 * length * length * m.num_heads * head_dim(m)
  head = 2 * m.d_model * m.vocab_size * head_positions
  return float(per_token_flops(m) * length + attention + head)


def train_step_flops(model_config, rows: int, length: int, head_positions_per_row: float) -> float:
  return 3.0 * rows * forward_flops(model_config, length, head_positions_per_row)


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the override, the data sheet of the device kind, or a measured matmul on CPU."""
  if override_tflops > 0:
    return override_tflops * 1e12
  dev = jax.devices()[0]
  for name, tflops in PEAK_TFLOPS.items():
    if dev.device_kind.startswith(name):
      return tflops * 1e12
  if dev.platform == "cpu":
    return measure_matmul_flops()
  return None


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """Best matmul throughput of the default device (FLOP/s), as a practical CPU peak.

  `dtype` is the operand dtype; the product accumulates in fp32 (`preferred_element_type`), the form the model's
  matmuls take (for bf16 on CPUs with AMX this is ~3x the fp32 rate).
  """
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best
