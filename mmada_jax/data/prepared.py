"""What prepared token shards depend on (their identity in the manifest), and the check that a prepared directory fits
a training run: task, vocabulary, text tokenizer, MAGVIT-v2 architecture and parameters, layout settings."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import jax
import numpy as np

from mmada_jax import checkpoint as ckpt
from mmada_jax.data import sources as src_lib
from mmada_jax.models import magvit
from mmada_jax.tokens import vocab as vocab_lib

PATH_KINDS = ("jsonl", "gsm8k", "parquet", "images", "wds")


def params_sha256(params: Any) -> str:
  """SHA-256 over every parameter leaf (key path, dtype, shape, bytes), in key-path order."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.name}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _checkpoint_sha256(path: str, stamp: int) -> str:
  del stamp  # part of the cache key only: a rewritten checkpoint is hashed again
  return params_sha256(ckpt.load_params(path, expected={"kind": "magvit"}, as_numpy=True)[0])


def checkpoint_sha256(path: str) -> str:
  """`params_sha256` of a MAGVIT-v2 parameter checkpoint (cached per path and modification time)."""
  path = os.path.abspath(path)
  meta = os.path.join(path, "metadata", "metadata")
  return _checkpoint_sha256(path, os.stat(meta).st_mtime_ns if os.path.exists(meta) else 0)


def text_tokenizer_identity(tokenizer) -> dict[str, Any]:
  return {"sha256": hashlib.sha256(tokenizer.tokenizer.to_str().encode("utf-8")).hexdigest(), "size": len(tokenizer)}


def vocab_facts(config) -> dict[str, Any]:
  return dict(sorted(vars(vocab_lib.Vocab.from_config(config.vocab)).items()))


def magvit_arch(config) -> dict[str, Any]:
  return magvit.MagvitConfig.from_config(config.magvit).arch_dict()


def layout_facts(config, task: str) -> dict[str, Any]:
  """Config values that change the stored text (the mmu prompt's end-of-turn text)."""
  return {"mmu_literal_eot": bool(config.data.mmu_literal_eot)} if task == "mmu" else {}


def source_identity(spec: str, variant: str, split: str, count: int, config) -> dict[str, Any]:
  """The source as a rerun must give it again: paths made absolute, generator settings, record count."""
  kind, _, arg = spec.partition(":")
  if kind in PATH_KINDS:
    arg = os.path.abspath(os.path.expanduser(arg))
  elif kind == "llava":
    path, _, root = arg.partition(":")
    arg = os.path.abspath(path) + (":" + os.path.abspath(root) if root else "")
  out = {"spec": f"{kind}:{arg}" if arg else kind, "variant": variant, "split": split, "records": count}
  if kind == "toyworld":
    out["toyworld"] = dict(sorted(config.data.toyworld.items()))
  if kind == "tfds":
    out["data_dir"] = config.data.data_dir
  return out


def diff_identity(have: Any, want: Any, prefix: str = "") -> list[str]:
  """Dotted `key: A vs B` lines for every leaf where two identity dicts differ."""
  if isinstance(have, dict) and isinstance(want, dict):
    out = []
    for key in sorted(set(have) | set(want)):
      out += diff_identity(have.get(key), want.get(key), f"{prefix}.{key}" if prefix else key)
    return out
  return [] if have == want else [f"{prefix}: {have!r} vs {want!r}"]


def check_prepared(manifest: dict, config, task: str, tokenizer, where: str = "tokens source") -> None:
  """Raises PreparedDataError unless a prepared directory fits this training run (task, vocab, text tokenizer, MAGVIT
  architecture, and the parameters of `data.image_tokenizer` when the config names one)."""
  ident = manifest["identity"]
  want = {"task": task, "vocab": vocab_facts(config), "text_tokenizer": text_tokenizer_identity(tokenizer),
          "image_tokenizer": {"magvit": magvit_arch(config)}, "layout": layout_facts(config, task)}
  have = {"task": ident["task"], "vocab": ident["vocab"], "text_tokenizer": ident["text_tokenizer"],
          "image_tokenizer": {"magvit": ident["image_tokenizer"]["magvit"]}, "layout": ident["layout"]}
  if config.data.image_tokenizer:
    want["image_tokenizer"]["param_sha256"] = checkpoint_sha256(config.data.image_tokenizer)
    have["image_tokenizer"]["param_sha256"] = ident["image_tokenizer"]["param_sha256"]
  diffs = diff_identity(have, want)
  if diffs:
    raise src_lib.PreparedDataError(
        f"{where}: prepared with other settings than this run (prepared vs config, "
        f"MAGVIT checkpoint {manifest.get('image_tokenizer_path')!r}):\n  " + "\n  ".join(diffs))
