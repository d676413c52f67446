"""MMaDA-8B (Gen-Verse/MMaDA-8B-Base / -MixCoT): the official shape and vocabulary.

LLaDA-8B backbone (32 layers, d_model 4096, 32 heads, SwiGLU 12288) with the embedding and head grown to 134,656 rows
for the 8,192 MAGVIT-v2 image codes (specs/mmada-official.md §0.1, §1.2, §1.7). 8,082,690,048 parameters.
Use `:512` for the released 512 px setting (1,024 image tokens per image).
"""

from mmada_jax.config import get_base_config


VARIANTS = ("256", "512")


def get_config(arg: str | None = None):
  config = get_base_config()
  config.name = "mmada_8b"
  config.model.param_dtype = "float32"
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "full"
  if arg == "512":
    config.vocab.num_image_tokens = 1024
    config.magvit.resolution = 512
    config.data.max_text_len = 512
  elif arg not in (None, "", "256"):
    raise ValueError(f"mmada_8b: unknown variant {arg!r} (use '256' or '512')")
  return config
