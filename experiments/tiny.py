"""Tiny backbone for tests and CPU smoke runs: the shape and token ids of the parity fixture set "A".

2 layers, d_model 64, 4 heads, SwiGLU 192, 300 vocabulary rows: 228 plain text ids, then <bos> 228, <eos> 229,
[MASK] 230, <|t2i|> 231, <|soi|> 232, <|eoi|> 233, <|mmu|> 234, [iPAD] 235, and 64 image codes at 236..299
(docs/parity.md §1-§2). The chat header tokens take three ordinary ids (225-227).
"""

from mmada_jax.config import get_base_config


def get_config(arg: str | None = None):
  del arg
  config = get_base_config()
  config.name = "tiny"
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_hidden, m.vocab_size = 2, 64, 4, 4, 192, 300
  v = config.vocab
  v.text_vocab_size, v.llm_vocab_size, v.codebook_size, v.image_offset = 236, 236, 64, 236
  v.bos_id, v.eos_id, v.pad_id, v.mask_id = 228, 229, 229, 230
  v.t2i_id, v.soi_id, v.eoi_id, v.mmu_id, v.ipad_id = 231, 232, 233, 234, 235
  v.sov_id, v.eov_id, v.t2v_id, v.v2v_id, v.lvg_id, v.r2i_id = 220, 221, 222, 223, 224, 219
  v.start_header_id, v.end_header_id, v.eot_id = 225, 226, 227
  v.num_image_tokens = 64
  g = config.magvit
  g.resolution, g.channels, g.encoder_channel_mult, g.encoder_num_res_blocks = 32, 32, (1, 2, 2), (2, 1, 1)
  g.decoder_channel_mult, g.decoder_num_res_blocks, g.codebook_bits = (1, 1, 2), (1, 2, 1), 6
  config.data.max_text_len = 7
  return config
