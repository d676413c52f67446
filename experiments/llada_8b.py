"""LLaDA-8B-Instruct (GSAI-ML/LLaDA-8B-Instruct): the text-only backbone MMaDA starts from.

Same shape as MMaDA-8B but 126,464 embedding rows and no image tokens (8,015,581,184 parameters). The vocabulary
section keeps the text ids of the 8B tokenizer; `codebook_size = 0` marks a text-only model.
"""

from mmada_jax.config import get_base_config


def get_config(arg: str | None = None):
  del arg
  config = get_base_config()
  config.name = "llada_8b"
  config.model.vocab_size = 126464
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.vocab.codebook_size = 0
  return config
