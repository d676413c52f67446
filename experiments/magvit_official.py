"""The official MMaDA / Show-o image tokenizer `showlab/magvitv2` (specs/mmada-official.md §2, Appendix A).

MAGVIT-v2 with a 13-bit lookup-free quantiser (8,192 codes) and x16 downsampling: 256 px -> 16 x 16 = 256 tokens
(pre-training stages 1-2), 512 px -> 32 x 32 = 1,024 tokens (released checkpoints and inference; `:512`).
Convert the weights with `convert_magvit_to_orbax(src, dst, config=config.magvit)`.
"""

from mmada_jax.config import get_base_config


def get_config(arg: str | None = None):
  resolution = int(arg) if arg else 256
  config = get_base_config()
  config.name = f"magvit_official_{resolution}"
  g = config.magvit
  # Image size of pre-processing. In the architecture it only places per-level attention, and with the official
  # attn_resolutions (5,) no level has any at 256 or 512 px, so both sizes load the same weights.
  g.resolution = resolution
  g.channels = 128
  g.encoder_channel_mult, g.encoder_num_res_blocks = (1, 2, 2, 4, 4), (4, 3, 4, 3, 4)
  g.decoder_channel_mult, g.decoder_num_res_blocks = (1, 1, 2, 2, 4), (4, 4, 3, 4, 3)
  g.codebook_bits = 13
  g.attn_resolutions = (5,)
  g.norm_groups, g.norm_eps = 32, 1e-6
  g.matmul_precision = "highest"  # full fp32 convolutions on TPU/GPU, as the official fp32 tokenizer
  g.beta, g.commit_multiplier, g.entropy_multiplier = 0.25, 0.1, 0.1
  g.resize_mode = "crop"
  config.vocab.codebook_size = 2 ** g.codebook_bits
  config.vocab.num_image_tokens = (resolution // 16) ** 2
  return config
