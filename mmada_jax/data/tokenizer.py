"""The text tokenizer of a config: the official tokenizer files in `data.tokenizer_dir`, or the ToyWorld tokenizer
trained for the config's vocabulary (about a second of work, deterministic in the config)."""

from __future__ import annotations

import json

from mmada_jax.data import toyworld
from mmada_jax.tokens import text_tokenizer, vocab as vocab_lib


def make_tokenizer(config) -> text_tokenizer.TextTokenizer:
  """A new tokenizer for `config` (see the module docstring)."""
  v = vocab_lib.Vocab.from_config(config.vocab)
  if config.data.tokenizer_dir:
    return text_tokenizer.TextTokenizer.from_dir(config.data.tokenizer_dir, v)
  return toyworld.toy_tokenizer(v, toyworld.ToyWorld.from_config(config))


_SHARED: dict[str, text_tokenizer.TextTokenizer] = {}


def shared_tokenizer(config) -> text_tokenizer.TextTokenizer:
  """`make_tokenizer(config)`, made once per process for each tokenizer source (the vocabulary, the tokenizer files
  or the ToyWorld settings and seed that train it): samplers, evaluations and RL runs in one process share it."""
  key = json.dumps({"vocab": config.vocab.to_dict(), "dir": str(config.data.tokenizer_dir),
                    "toyworld": config.data.toyworld.to_dict(), "seed": int(config.seed)}, sort_keys=True, default=str)
  if key not in _SHARED:
    _SHARED[key] = make_tokenizer(config)
  return _SHARED[key]
