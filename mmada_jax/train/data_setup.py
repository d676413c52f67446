"""The training data of a config: text tokenizer, optional online image encoder, and the grain batch iterator."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmada_jax.data import pipelines, toyworld
from mmada_jax.tokens import text_tokenizer, vocab as vocab_lib


def make_tokenizer(config) -> text_tokenizer.TextTokenizer:
  """The official tokenizer files in `data.tokenizer_dir`, or the ToyWorld tokenizer trained for the config's vocab."""
  v = vocab_lib.Vocab.from_config(config.vocab)
  if config.data.tokenizer_dir:
    return text_tokenizer.TextTokenizer.from_dir(config.data.tokenizer_dir, v)
  return toyworld.toy_tokenizer(v, toyworld.ToyWorld.from_config(config))


def make_image_encoder(config) -> Callable[[np.ndarray], np.ndarray] | None:
  """[H, W, 3] uint8 -> [N] codes with the MAGVIT-v2 checkpoint in `data.image_tokenizer` (jitted), or None."""
  if not config.data.image_tokenizer:
    return None
  import jax

  from mmada_jax import checkpoint as ckpt
  from mmada_jax.models import magvit

  params, meta = ckpt.load_params(config.data.image_tokenizer, expected={"kind": "magvit"})
  model = magvit.MagvitV2(magvit.MagvitConfig.from_config(config.magvit))
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=magvit.MagvitV2.get_code))

  def encoder(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32)[None] / 127.5 - 1.0
    return np.asarray(encode(params, x))[0]

  return encoder


def make_data(config, split: str = "train") -> pipelines.MixedBatchIterator:
  return pipelines.build_iterator(config, make_tokenizer(config), make_image_encoder(config), split=split)
