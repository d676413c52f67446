"""A ~1B-parameter backbone for accelerator benchmarks (953,223,168 parameters): `mmada-jax bench train|generate`.

16 layers, d_model 2048, 16 heads of 128, SwiGLU 5632, the bench config's 32,000-row vocabulary (experiments/bench.py);
fp32 parameters, bf16 compute, cuDNN's fused attention, layers stacked with `nn.scan` (one compiled layer body).
On a CPU, use `--config.model.attention_impl=einsum` (cuDNN exists on NVIDIA GPUs only).
"""

import os

from mmada_jax.config import load_module


def get_config(arg: str | None = None):
  del arg
  config = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")).get_config()
  config.name = "bench_1b"
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_hidden = 16, 2048, 16, 16, 5632
  m.param_dtype, m.dtype = "float32", "bfloat16"
  m.attention_impl = "cudnn"
  m.scan_layers = True
  config.loss.head_chunk = 128  # the config default: the gathered LM head in chunks of 128 positions per row
  return config
