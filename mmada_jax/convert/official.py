"""Official MMaDA / LLaDA Hugging Face checkpoints <-> our parameter tree (Decision 3).

Import: a directory with `config.json` and `*.safetensors` (optionally sharded with `model.safetensors.index.json`)
becomes an Orbax parameter checkpoint (see `mmada_jax.checkpoint`), in the stacked (scanned) or unstacked layer
layout. Tensors are read one at a time from memory-mapped files and written into preallocated output leaves, so the
conversion needs the output plus about one tensor of working memory; dtypes are kept (bf16 stays bf16).

Export: our checkpoint back to official safetensors + `config.json`. The original file split, tensor order, header
metadata, index and config text are stored in the checkpoint metadata at import, so an unmodified round trip is
byte-identical.

Key mapping (specs/mmada-official.md §1.6; PyTorch Linear weights are (out, in), our kernels are (in, ...out)):
  model.transformer.wte.weight (V, d)                  -> wte (V, d)
  model.transformer.blocks.{i}.attn_norm.weight (d,)   -> blocks/attn_norm/scale
  model.transformer.blocks.{i}.{q,k,v}_proj.weight     -> blocks/attn/{q,k,v}_proj/kernel (d, heads, head_dim)
  model.transformer.blocks.{i}.attn_out.weight (d, d)  -> blocks/attn/attn_out/kernel (heads, head_dim, d)
  model.transformer.blocks.{i}.ff_norm.weight (d,)     -> blocks/ff_norm/scale
  model.transformer.blocks.{i}.{ff_proj,up_proj}.weight (F, d) -> blocks/mlp/{ff_proj,up_proj}/kernel (d, F)
  model.transformer.blocks.{i}.ff_out.weight (d, F)    -> blocks/mlp/ff_out/kernel (F, d)
  model.transformer.ln_f.weight (d,)                   -> ln_f/scale
  model.transformer.ff_out.weight (V, d)               -> lm_head/kernel (d, V)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import numpy as np

from mmada_jax import checkpoint as ckpt
from mmada_jax.config import head_dim, model_section
from mmada_jax.convert import safetensors_io as st

PREFIX = "model.transformer."
KIND = "mmada_backbone"

# Official config flags whose values we implement; anything else is refused with a message.
SUPPORTED_FLAGS = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "attention_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
    "rope": True, "alibi": False, "weight_tying": False, "scale_logits": False, "input_emb_norm": False,
    "block_group_size": 1,
}


class ConversionError(ValueError):
  """The official checkpoint does not match the expected keys, shapes or configuration."""


@dataclasses.dataclass(frozen=True)
class Shape:
  """The model facts a conversion needs (our `config.model` names)."""
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_hidden: int
  vocab_size: int
  rope_theta: float
  norm_eps: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Per-tensor transforms. Each official block tensor maps to (our path inside a block, to_ours, to_official).


def _in_heads(s: Shape, heads: int) -> tuple[Callable, Callable]:
  """(heads*hd, d) weight <-> (d, heads, hd) kernel."""
  return (lambda w: w.T.reshape(s.d_model, heads, s.head_dim),
          lambda k: k.reshape(s.d_model, heads * s.head_dim).T)


def _transpose() -> tuple[Callable, Callable]:
  return (lambda w: w.T, lambda k: k.T)


def _identity() -> tuple[Callable, Callable]:
  return (lambda w: w, lambda k: k)


def block_table(s: Shape) -> dict[str, tuple[tuple[str, ...], Callable, Callable, tuple[int, ...], tuple[int, ...]]]:
  """official suffix -> (our path in a block, to_ours, to_official, official shape, our shape)."""
  d, f, hd = s.d_model, s.mlp_hidden, s.head_dim
  q, kv = s.num_heads * hd, s.num_kv_heads * hd
  out_fw = (lambda w: w.T.reshape(s.num_heads, hd, d), lambda k: k.reshape(q, d).T)
  return {
      "attn_norm.weight": (("attn_norm", "scale"), *_identity(), (d,), (d,)),
      "q_proj.weight": (("attn", "q_proj", "kernel"), *_in_heads(s, s.num_heads), (q, d), (d, s.num_heads, hd)),
      "k_proj.weight": (("attn", "k_proj", "kernel"), *_in_heads(s, s.num_kv_heads), (kv, d),
                        (d, s.num_kv_heads, hd)),
      "v_proj.weight": (("attn", "v_proj", "kernel"), *_in_heads(s, s.num_kv_heads), (kv, d),
                        (d, s.num_kv_heads, hd)),
      "attn_out.weight": (("attn", "attn_out", "kernel"), *out_fw, (d, q), (s.num_heads, hd, d)),
      "ff_norm.weight": (("ff_norm", "scale"), *_identity(), (d,), (d,)),
      "ff_proj.weight": (("mlp", "ff_proj", "kernel"), *_transpose(), (f, d), (d, f)),
      "up_proj.weight": (("mlp", "up_proj", "kernel"), *_transpose(), (f, d), (d, f)),
      "ff_out.weight": (("mlp", "ff_out", "kernel"), *_transpose(), (d, f), (f, d)),
  }


def top_table(s: Shape):
  """Non-block tensors, same tuple layout as `block_table`."""
  v, d = s.vocab_size, s.d_model
  return {
      "wte.weight": (("wte",), *_identity(), (v, d), (v, d)),
      "ln_f.weight": (("ln_f", "scale"), *_identity(), (d,), (d,)),
      "ff_out.weight": (("lm_head", "kernel"), *_transpose(), (v, d), (d, v)),
  }


def expected_keys(s: Shape) -> list[str]:
  keys = [PREFIX + k for k in top_table(s)]
  for i in range(s.num_layers):
    keys += [f"{PREFIX}blocks.{i}.{k}" for k in block_table(s)]
  return keys


# ----------------------------------------------------------------------------------------------------------------------
# Shapes from config.json / state dict / our config


def shape_from_official_config(cfg: dict) -> Shape:
  """Reads the LLaDA/MMaDA `config.json`; refuses flags we do not implement."""
  bad = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in SUPPORTED_FLAGS.items() if k in cfg and cfg[k] != v]
  if cfg.get("multi_query_attention"):
    bad.append(f"multi_query_attention={cfg['multi_query_attention']!r} (supported: null)")
  if bad:
    raise ConversionError("config.json describes an architecture this converter does not implement: " + ", ".join(bad))
  missing = [k for k in ("d_model", "n_heads", "n_layers") if k not in cfg]
  if missing:
    raise ConversionError(f"config.json lacks {missing}")
  d, heads = int(cfg["d_model"]), int(cfg["n_heads"])
  mlp = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d
  vocab = cfg.get("embedding_size") or cfg.get("vocab_size")
  return Shape(num_layers=int(cfg["n_layers"]), d_model=d, num_heads=heads,
               num_kv_heads=int(cfg.get("n_kv_heads") or heads), head_dim=d // heads, mlp_hidden=int(mlp),
               vocab_size=int(vocab), rope_theta=float(cfg.get("rope_theta", 10000.0)),
               norm_eps=float(cfg.get("rms_norm_eps", 1e-5)))


def shape_from_model_config(m) -> Shape:
  return Shape(num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
               head_dim=head_dim(m), mlp_hidden=m.mlp_hidden, vocab_size=m.vocab_size, rope_theta=float(m.rope_theta),
               norm_eps=float(m.norm_eps))


def model_config_for(s: Shape, base=None):
  """A `config.model` section with the checkpoint's shape (other fields from `base` or the defaults)."""
  m = model_section() if base is None else base.copy_and_resolve_references()
  for k, v in s.as_dict().items():
    m[k] = v
  return m


def check_against_config(weights: Shape, ours: Shape, source: str) -> None:
  """Names every `config.model` value that contradicts the official checkpoint."""
  names = {"num_layers": "n_layers", "d_model": "d_model", "num_heads": "n_heads", "num_kv_heads": "n_kv_heads",
           "head_dim": "d_model/n_heads", "mlp_hidden": "mlp_hidden_size", "vocab_size": "embedding_size (rows)",
           "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps"}
  diffs = [f"model.{k}={getattr(ours, k)} but {source} has {names[k]}={getattr(weights, k)}"
           for k in names if getattr(ours, k) != getattr(weights, k)]
  if diffs:
    raise ConversionError("the config contradicts the checkpoint:\n  " + "\n  ".join(diffs))


def check_keys_and_shapes(src: st.CheckpointDir, s: Shape) -> None:
  """Missing / unexpected keys are listed; a shape mismatch names the key and both shapes."""
  want = expected_keys(s)
  have = set(src.keys())
  missing = [k for k in want if k not in have]
  unexpected = sorted(have - set(want))
  errors = []
  if missing:
    errors.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
  if unexpected:
    errors.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
  shapes = {PREFIX + k: v[3] for k, v in top_table(s).items()}
  for i in range(s.num_layers):
    shapes.update({f"{PREFIX}blocks.{i}.{k}": v[3] for k, v in block_table(s).items()})
  for k, shape in shapes.items():
    if k in have and tuple(src.info(k).shape) != tuple(shape):
      errors.append(f"{k}: checkpoint shape {list(src.info(k).shape)}, the config implies {list(shape)}")
  if errors:
    raise ConversionError(f"{src.path} does not match the model ({s.num_layers} layers, d_model {s.d_model}, "
                          f"{s.num_heads} heads, vocab {s.vocab_size}):\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------------------------------------------------
# Import


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def official_to_tree(src: st.CheckpointDir, s: Shape, layout: str = "stacked", progress: Callable | None = None):
  """Builds our parameter tree (numpy) from the official tensors, one tensor at a time."""
  if layout not in ("stacked", "unstacked"):
    raise ValueError(f"layout must be 'stacked' or 'unstacked', got {layout!r}")
  tree: dict = {}
  for suffix, (path, to_ours, _, _, _) in top_table(s).items():
    _set(tree, path, np.ascontiguousarray(to_ours(src.get(PREFIX + suffix))))
    progress and progress(PREFIX + suffix)
  for suffix, (path, to_ours, _, _, our_shape) in block_table(s).items():
    if layout == "stacked":
      dtype = src.info(f"{PREFIX}blocks.0.{suffix}").np_dtype
      out = np.empty((s.num_layers, *our_shape), dtype)
      _set(tree, ("blocks",) + path, out)
    for i in range(s.num_layers):
      key = f"{PREFIX}blocks.{i}.{suffix}"
      value = to_ours(src.get(key))
      if layout == "stacked":
        if src.info(key).np_dtype != out.dtype:
          raise ConversionError(f"{key}: dtype {src.info(key).dtype} differs from layer 0 ({out.dtype}); a stacked "
                                "layout needs one dtype per tensor kind (use --layout unstacked)")
        out[i] = value
      else:
        _set(tree, (f"blocks_{i}",) + path, np.ascontiguousarray(value))
      progress and progress(key)
  return tree


def vocab_facts(cfg: dict) -> dict:
  """Vocabulary facts found in an official config.json (recorded in checkpoint metadata)."""
  keys = ("mask_token_id", "eos_token_id", "pad_token_id", "llm_vocab_size", "codebook_size", "num_vq_tokens",
          "new_vocab_size", "vocab_size", "embedding_size")
  return {k: cfg[k] for k in keys if k in cfg}


def resize_vocab(tree: dict, s: Shape, rows: int) -> Shape:
  """Grows the embedding and the LM head to `rows` entries (MMaDA stage 1.1 starts from LLaDA-8B this way).

  New rows are the mean of the existing ones, which is what Hugging Face's mean-resizing amounts to (it samples around
  the mean with a negligible covariance), so new tokens start as an "average" token.
  """
  if rows < s.vocab_size:
    raise ConversionError(f"--resize_vocab {rows} is smaller than the checkpoint's {s.vocab_size} rows")
  wte, head = tree["wte"], tree["lm_head"]["kernel"]
  extra = rows - s.vocab_size
  mean_row = wte.astype(np.float32).mean(axis=0).astype(wte.dtype)
  tree["wte"] = np.concatenate([wte, np.broadcast_to(mean_row, (extra, s.d_model))], axis=0)
  mean_col = head.astype(np.float32).mean(axis=1).astype(head.dtype)
  tree["lm_head"]["kernel"] = np.concatenate([head, np.broadcast_to(mean_col[:, None], (s.d_model, extra))], axis=1)
  return dataclasses.replace(s, vocab_size=rows)


def import_official(src_dir: str, dst: str, *, layout: str = "stacked", model_config=None, vocab_config=None,
                    overwrite: bool = False, resize_to: int = 0, log: Callable[[str], None] = print) -> dict:
  """Converts an official checkpoint directory into an Orbax parameter checkpoint at `dst`. Returns the metadata.

  `resize_to` > 0 grows the vocabulary rows first (e.g. 126464 -> 134656 to start MMaDA from LLaDA-8B).
  """
  t0 = time.time()
  src = st.CheckpointDir(src_dir)
  cfg = src.config()
  if cfg is None:
    raise ConversionError(f"{src_dir}: no config.json (an official checkpoint directory has config.json and "
                          "*.safetensors)")
  s = shape_from_official_config(cfg)
  check_keys_and_shapes(src, s)
  if model_config is not None:
    grown = dataclasses.replace(s, vocab_size=resize_to) if resize_to else s
    check_against_config(grown, shape_from_model_config(model_config), f"{src_dir}/config.json")
  if vocab_config is not None and "mask_token_id" in cfg and cfg["mask_token_id"] != vocab_config.mask_id:
    raise ConversionError(f"vocab.mask_id={vocab_config.mask_id} but config.json has mask_token_id="
                          f"{cfg['mask_token_id']}")
  n_total, done = len(src.keys()), [0]

  def progress(key):
    done[0] += 1
    if done[0] % 50 == 0 or done[0] == n_total:
      log(f"  read {done[0]}/{n_total} tensors ({time.time() - t0:.1f}s)")

  tree = official_to_tree(src, s, layout, progress)
  official_files = {"layout": src.layout(), "config_json": _read_text(src_dir, "config.json"),
                    "index_json": _read_text(src_dir, st.INDEX_NAME)}
  if resize_to and resize_to != s.vocab_size:
    log(f"growing the vocabulary from {s.vocab_size} to {resize_to} rows")
    s = resize_vocab(tree, s, resize_to)
    official_files = None  # the original files no longer describe these weights; export writes fresh ones
  meta = {
      "kind": KIND, "layer_layout": layout, "model": s.as_dict(), "vocab": vocab_facts(cfg),
      "dtypes": sorted({src.info(k).dtype for k in src.keys()}), "official": official_files,
  }
  if vocab_config is not None:
    meta["vocab"].update({"image_offset": vocab_config.image_offset, "mask_id": vocab_config.mask_id,
                          "codebook_size": vocab_config.codebook_size})
  log(f"writing {dst} ({layout} layout)")
  ckpt.save_params(dst, tree, meta, overwrite=overwrite)
  log(f"converted {n_total} tensors in {time.time() - t0:.1f}s")
  return meta


def _read_text(directory: str, name: str) -> str | None:
  p = os.path.join(directory, name)
  if not os.path.exists(p):
    return None
  with open(p, encoding="utf-8") as f:
    return f.read()


# ----------------------------------------------------------------------------------------------------------------------
# Export


def detect_layout(tree: dict) -> str:
  if "blocks" in tree:
    return "stacked"
  if "blocks_0" in tree:
    return "unstacked"
  raise ConversionError(f"parameter tree has neither 'blocks' nor 'blocks_0' (top-level keys: {sorted(tree)})")


def tree_to_official(tree: dict, s: Shape) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], Callable]:
  """(specs of every official tensor, producer name -> array) for our tree; producers convert lazily."""
  layout = detect_layout(tree)
  specs, producers = {}, {}
  for suffix, (path, _, to_off, off_shape, _) in top_table(s).items():
    arr = _get(tree, path)
    specs[PREFIX + suffix] = (off_shape, np.dtype(arr.dtype))
    producers[PREFIX + suffix] = (lambda a=arr, f=to_off: f(np.asarray(a)))
  for suffix, (path, _, to_off, off_shape, _) in block_table(s).items():
    for i in range(s.num_layers):
      key = f"{PREFIX}blocks.{i}.{suffix}"
      if layout == "stacked":
        arr = _get(tree, ("blocks",) + path)
        producers[key] = (lambda a=arr, i=i, f=to_off: f(np.asarray(a[i])))
      else:
        arr = _get(tree, (f"blocks_{i}",) + path)
        producers[key] = (lambda a=arr, f=to_off: f(np.asarray(a)))
      specs[key] = (off_shape, np.dtype(arr.dtype))
  return specs, lambda name: producers[name]()


def synthesize_config_json(s: Shape, vocab: dict) -> dict:
  """A LLaDA-style config.json for a tree that did not come from an official checkpoint."""
  cfg = dict(SUPPORTED_FLAGS)
  cfg.update({"d_model": s.d_model, "n_heads": s.num_heads, "n_kv_heads": s.num_kv_heads, "n_layers": s.num_layers,
              "mlp_hidden_size": s.mlp_hidden, "vocab_size": s.vocab_size, "embedding_size": s.vocab_size,
              "rope_theta": s.rope_theta, "rms_norm_eps": s.norm_eps, "rope_full_precision": True,
              "multi_query_attention": None, "model_type": "mmada", "architectures": ["MMadaModelLM"]})
  cfg.update({k: v for k, v in vocab.items() if k.endswith("_token_id") or k in ("llm_vocab_size", "codebook_size",
                                                                                  "num_vq_tokens")})
  return cfg


def export_official(src: str, dst_dir: str, *, max_shard_bytes: int = 5 * 2**30, log: Callable[[str], None] = print):
  """Writes our parameter checkpoint `src` as an official checkpoint directory `dst_dir`."""
  t0 = time.time()
  tree, meta = ckpt.load_params(src, as_numpy=True)
  if meta.get("kind") != KIND:
    raise ConversionError(f"{src} holds {meta.get('kind')!r} parameters, not an MMaDA backbone")
  s = Shape(**meta["model"])
  specs, produce = tree_to_official(tree, s)
  if os.path.exists(dst_dir) and os.listdir(dst_dir):
    raise ConversionError(f"{dst_dir} exists and is not empty; refusing to overwrite it")
  os.makedirs(dst_dir, exist_ok=True)
  official = meta.get("official") or {}
  layout = official.get("layout")
  if layout and sorted(k for f in layout["files"].values() for k in f["order"]) == sorted(specs):
    files = {name: (f["order"], f["metadata"]) for name, f in layout["files"].items()}
    has_index = layout["has_index"]
  else:
    files = _shard(specs, max_shard_bytes)
    has_index = len(files) > 1
  total = 0
  for name, (order, metadata) in files.items():
    total += st.write_file(os.path.join(dst_dir, name), order, specs, produce, metadata)
    log(f"  wrote {name} ({time.time() - t0:.1f}s)")
  config_text = official.get("config_json") or json.dumps(synthesize_config_json(s, meta.get("vocab", {})), indent=2)
  with open(os.path.join(dst_dir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config_text)
  if has_index:
    index_text = official.get("index_json") if layout else None
    if index_text is None:
      weight_map = {k: n for n, (order, _) in files.items() for k in order}
      data_bytes = sum(int(np.prod(sh)) * np.dtype(dt).itemsize for sh, dt in specs.values())
      index_text = json.dumps({"metadata": {"total_size": data_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                              indent=2) + "\n"
    with open(os.path.join(dst_dir, st.INDEX_NAME), "w", encoding="utf-8") as f:
      f.write(index_text)
  log(f"exported {len(specs)} tensors to {dst_dir} in {time.time() - t0:.1f}s")
  return total


def _shard(specs, max_bytes: int) -> dict[str, tuple[list[str], Any]]:
  """Splits tensors (canonical order) into files of at most `max_bytes` (HF naming)."""
  groups, current, size = [], [], 0
  for k in st.canonical_order(specs):
    nbytes = int(np.prod(specs[k][0])) * np.dtype(specs[k][1]).itemsize
    if current and size + nbytes > max_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(k)
    size += nbytes
  groups.append(current)
  if len(groups) == 1:
    return {"model.safetensors": (groups[0], {"format": "pt"})}
  n = len(groups)
  return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": (g, {"format": "pt"}) for i, g in enumerate(groups)}
