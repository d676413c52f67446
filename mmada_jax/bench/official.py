"""Side-by-side timing of the official MMaDA PyTorch code on the identical workload (`--official DIR`).

The official code is imported at run time from the user's checkout of Gen-Verse/MMaDA (the shared fixtures were
timed at commit 3cdb8709635beb29f66e4e23cd66060872ac3996) by `official_runner.py`, executed with a Python that has
torch (`--official_python`, default `$MMADA_OFFICIAL_PYTHON` or `python3`); mmada-jax itself never imports torch. The
official model gets OUR random weights (exported with the checkpoint converter) and the same inputs, so the generated
tokens can be compared as well as the times. Rounds alternate ours / official, as the fixtures README recommends
(the machine's speed drifts by up to ±30 % between back-to-back runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

import jax
import numpy as np

from mmada_jax.bench.common import BenchError
from mmada_jax.convert import official as conv

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_runner.py")
TIMED_COMMIT = "3cdb8709635beb29f66e4e23cd66060872ac3996"
# LLaDA-8B behaviour flags of the official ModelConfig (every field must be present; sizes come from our config).
LLADA_FLAGS = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "max_sequence_length": 4096, "mlp_ratio": 4, "multi_query_attention": None,
    "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
    "scale_logits": False, "use_cache": False, "weight_tying": False, "model_type": "mmada",
    "architectures": ["MMadaModelLM"],
}


def check_checkout(directory: str) -> dict:
  """Checks that `directory` is an official MMaDA checkout; returns {"path", "commit"} (commit None if unknown)."""
  need = [os.path.join(directory, "generate.py"), os.path.join(directory, "models", "modeling_mmada.py")]
  missing = [p for p in need if not os.path.isfile(p)]
  if missing:
    raise BenchError(f"--official {directory}: not a Gen-Verse/MMaDA checkout (missing {', '.join(missing)})")
  commit = None
  try:
    commit = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    pass
  return {"path": os.path.abspath(directory), "commit": commit}


def official_config(config) -> dict:
  """The `MMadaConfig(**cfg)` dictionary of our `config.model` / `config.vocab`."""
  m, v = config.model, config.vocab
  cfg = dict(LLADA_FLAGS)
  cfg.update({"d_model": m.d_model, "n_heads": m.num_heads, "n_kv_heads": m.num_kv_heads, "n_layers": m.num_layers,
              "mlp_hidden_size": m.mlp_hidden, "vocab_size": m.vocab_size, "embedding_size": m.vocab_size,
              "rope_theta": float(m.rope_theta), "rms_norm_eps": float(m.norm_eps), "mask_token_id": v.mask_id,
              "eos_token_id": v.eot_id, "pad_token_id": v.eot_id, "llm_vocab_size": m.vocab_size, "codebook_size": 0,
              "num_vq_tokens": 0, "new_vocab_size": m.vocab_size, "num_new_special_tokens": 0})
  return cfg


def export_weights(params: Any, config, path: str) -> None:
  """Our parameters as the official state dict (.npz, float32)."""
  s = conv.shape_from_model_config(config.model)
  host = jax.tree.map(np.asarray, params)
  specs, produce = conv.tree_to_official(host, s)
  np.savez(path, **{name: np.asarray(produce(name), np.float32) for name in specs})


class OfficialRunner:
  """Writes the weights once; each `run(workload, inputs, **settings)` is one official subprocess (one round)."""

  def __init__(self, directory: str, python: str | None, params: Any, config, threads: int = 0, log=print):
    self.checkout = check_checkout(directory)
    self.python = python or os.environ.get("MMADA_OFFICIAL_PYTHON") or "python3"
    self.config, self.threads, self.log = config, threads, log
    self.tmp = tempfile.TemporaryDirectory(prefix="mmada_bench_official_")
    self.weights = os.path.join(self.tmp.name, "weights.npz")
    export_weights(params, config, self.weights)

  def run(self, workload: str, inputs: dict[str, np.ndarray], repeats: int, warmup: int, **settings) -> dict:
    inputs_path = os.path.join(self.tmp.name, "inputs.npz")
    np.savez(inputs_path, **inputs)
    out = os.path.join(self.tmp.name, "result.json")
    if os.path.exists(out):
      os.remove(out)
    spec = dict(settings, checkout=self.checkout["path"], config=official_config(self.config), weights=self.weights,
                inputs=inputs_path, workload=workload, repeats=repeats, warmup=warmup, threads=self.threads, out=out,
                mask_id=int(self.config.vocab.mask_id))
    spec_path = os.path.join(self.tmp.name, "spec.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    proc = subprocess.run([self.python, RUNNER, spec_path], capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out):
      tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
      raise BenchError(f"the official run failed ({self.python} {RUNNER}, exit {proc.returncode}); it needs torch and "
                       f"the official requirements (transformers 4.46, diffusers 0.32, einops, jaxtyping, typeguard, "
                       f"omegaconf) in that Python — set --official_python:\n{tail}")
    with open(out) as f:
      return json.load(f)

  def close(self) -> None:
    self.tmp.cleanup()


def ratio_summary(ours_times: list[float], official_times: list[float]) -> dict:
  """Medians over every round and the speed-up official / ours."""
  o, t = float(np.median(ours_times)), float(np.median(official_times))
  return {"official_median_s": t, "official_min_s": min(official_times), "official_max_s": max(official_times),
          "official_times_s": list(official_times), "ours_median_s": o, "speedup": t / o}

