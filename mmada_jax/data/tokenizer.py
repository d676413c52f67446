"""The text tokenizer of a config: the official tokenizer files in `data.tokenizer_dir`, or the ToyWorld tokenizer
trained for the config's vocabulary (about a second of work, deterministic in the config)."""

from __future__ import annotations

import functools
import json

from mmada_jax.data import toyworld
from mmada_jax.tokens import text_tokenizer, vocab as vocab_lib


def make_tokenizer(config) -> text_tokenizer.TextTokenizer:
  """A new tokenizer for `config` (see the module docstring)."""
  v = vocab_lib.Vocab.from_config(config.vocab)
  if config.data.tokenizer_dir:
    return text_tokenizer.TextTokenizer.from_dir(config.data.tokenizer_dir, v)
  return toyworld.toy_tokenizer(v, toyworld.ToyWorld.from_config(config))


def shared_tokenizer(config) -> text_tokenizer.TextTokenizer:
  """`make_tokenizer(config)`, made once per process for each tokenizer source (the vocabulary, the tokenizer files
  or the ToyWorld settings and seed that train it): samplers, evaluations and RL runs in one process share it."""
  key = json.dumps({"vocab": config.vocab.to_dict(), "dir": str(config.data.tokenizer_dir),
                    "toyworld": config.data.toyworld.to_dict(), "seed": int(config.seed)}, sort_keys=True, default=str)
  return _cached(key, _Frozen(config))


class _Frozen:
  """Carries the config into the cache without taking part in its key (the key says everything that matters)."""

  def __init__(self, config):
    self.config = config

  def __hash__(self) -> int:
    return 0

  def __eq__(self, other) -> bool:
    return isinstance(other, _Frozen)


@functools.lru_cache(maxsize=16)
def _cached(key: str, frozen: _Frozen) -> text_tokenizer.TextTokenizer:
  del key  # the cache key
  return make_tokenizer(frozen.config)
