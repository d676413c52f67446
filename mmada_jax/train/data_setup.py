"""The training data of a config: the grain batch iterator over its mixture, with its text tokenizer and (when
`data.image_tokenizer` is set) the online MAGVIT-v2 encoder."""

from __future__ import annotations

from mmada_jax.data import pipelines
from mmada_jax.data.tokenizer import shared_tokenizer
from mmada_jax.inference.image_tokenizer import online_encoder


def make_data(config, split: str = "train") -> pipelines.MixedBatchIterator:
  return pipelines.build_iterator(config, shared_tokenizer(config), online_encoder(config), split=split)
