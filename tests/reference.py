"""An independent float64 NumPy forward pass of the official backbone, written from the spec formulas
(docs/parity.md §4), and a writer of synthetic fixture sets in the official format."""

import json
import pathlib

import numpy as np

from mmada_jax.convert import safetensors_io as st

P = "model.transformer."


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(sd: dict, cfg: dict, ids: np.ndarray, pair_mask: np.ndarray | None = None):
  """Returns (logits [B, L, V], hidden states [layers + 1, B, L, d]) in float64."""
  g = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  d, h, nl = cfg["d_model"], cfg["n_heads"], cfg["n_layers"]
  kvh = cfg.get("n_kv_heads") or h
  hd, eps, theta = d // h, cfg["rms_norm_eps"], cfg["rope_theta"]
  b, length = ids.shape
  x = g[P + "wte.weight"][ids]
  inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(length)[:, None] * inv
  emb = np.concatenate([ang, ang], -1)
  sin, cos = np.sin(emb), np.cos(emb)
  rot = lambda u: np.concatenate([-u[..., hd // 2:], u[..., :hd // 2]], -1)
  hidden = []
  for i in range(nl):
    w = lambda n: g[f"{P}blocks.{i}.{n}.weight"]
    hidden.append(x)
    n = _rms(x, w("attn_norm"), eps)
    q = (n @ w("q_proj").T).reshape(b, length, h, hd).transpose(0, 2, 1, 3)
    k = (n @ w("k_proj").T).reshape(b, length, kvh, hd).transpose(0, 2, 1, 3)
    v = (n @ w("v_proj").T).reshape(b, length, kvh, hd).transpose(0, 2, 1, 3)
    k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if pair_mask is not None:
      s = np.where(pair_mask[:, None], s, np.finfo(np.float32).min)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    x = x + a.transpose(0, 2, 1, 3).reshape(b, length, d) @ w("attn_out").T
    n = _rms(x, w("ff_norm"), eps)
    gate = n @ w("ff_proj").T
    x = x + ((gate / (1 + np.exp(-gate))) * (n @ w("up_proj").T)) @ w("ff_out").T
  xf = _rms(x, g[P + "ln_f.weight"], eps)
  hidden.append(xf)
  return xf @ g[P + "ff_out.weight"].T, np.stack(hidden)


def write_fixture_set(directory: pathlib.Path, stem: str, *, d=48, heads=6, kv_heads=3, layers=3, mlp=80, vocab=173,
                      theta=10000.0, seed=0, dtype=np.float32):
  """A random backbone in the official key layout plus its reference outputs, named like the parity sets."""
  rng = np.random.default_rng(seed)
  hd = d // heads
  cfg = {"d_model": d, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers, "mlp_hidden_size": mlp,
         "vocab_size": vocab, "embedding_size": vocab, "rope_theta": theta, "rms_norm_eps": 1e-5,
         "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "weight_tying": False,
         "mask_token_id": vocab - 2}
  sd = {P + "wte.weight": rng.normal(size=(vocab, d)), P + "ln_f.weight": 1 + 0.2 * rng.normal(size=d),
        P + "ff_out.weight": rng.normal(size=(vocab, d)) * 3 / np.sqrt(d)}
  shapes = {"attn_norm": (d,), "ff_norm": (d,), "q_proj": (d, d), "k_proj": (kv_heads * hd, d),
            "v_proj": (kv_heads * hd, d), "attn_out": (d, d), "ff_proj": (mlp, d), "up_proj": (mlp, d),
            "ff_out": (d, mlp)}
  for i in range(layers):
    for n, shape in shapes.items():
      key = f"{P}blocks.{i}.{n}.weight"
      sd[key] = 1 + 0.2 * rng.normal(size=shape) if len(shape) == 1 else rng.normal(size=shape) / np.sqrt(shape[1])
  sd = {k: v.astype(dtype) for k, v in sd.items()}
  specs = {k: (v.shape, v.dtype) for k, v in sd.items()}
  st.write_file(str(directory / f"{stem}.safetensors"), st.canonical_order(specs), specs, sd.__getitem__)
  (directory / f"{stem}_config.json").write_text(json.dumps(cfg, indent=2))
  ids = rng.integers(0, vocab, size=(3, 20))
  mask = np.ones((3, 20), np.int64)
  mask[1, :4] = 0
  mask[2, -3:] = 0
  pair = mask[:, :, None].astype(bool) & mask[:, None, :].astype(bool)
  logits, hidden = forward(sd, cfg, ids)
  logits_b, _ = forward(sd, cfg, ids, pair)
  np.savez(directory / f"{stem}_io.npz", input_ids=ids, attention_mask=mask, attention_bias=pair[:, None],
           logits_nomask=logits.astype(np.float32), logits_attention_bias=logits_b.astype(np.float32),
           hidden_states_nomask=hidden.astype(np.float32))
  return sd, cfg
