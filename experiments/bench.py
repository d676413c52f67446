"""The shared benchmark model (60,039,680 parameters), timed against the official PyTorch code.

d_model 512, 8 layers, 8 heads (head dim 64), SwiGLU 1536, 32,000 vocabulary rows, [MASK] = 31000, rope theta 5e5,
fp32 (the official baseline runs fp32 throughout). Text ids are 0..31015, image codes 31016..31527.
"""

from mmada_jax.config import get_base_config


def get_config(arg: str | None = None):
  del arg
  config = get_base_config()
  config.name = "bench"
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_hidden, m.vocab_size = 8, 512, 8, 8, 1536, 32000
  m.scan_layers = False  # unrolled: on CPU a scan without remat runs single-threaded (DESIGN.md performance notes)
  v = config.vocab
  v.text_vocab_size, v.llm_vocab_size, v.codebook_size, v.image_offset = 31016, 31016, 512, 31016
  v.mask_id = 31000
  v.bos_id, v.eos_id, v.pad_id, v.soi_id, v.eoi_id, v.sov_id, v.eov_id = 31001, 31002, 31002, 31003, 31004, 31005, 31006
  v.t2i_id, v.mmu_id, v.t2v_id, v.v2v_id = 31007, 31008, 31009, 31010
  v.lvg_id, v.ipad_id, v.r2i_id = 31011, 31012, 31013
  v.start_header_id, v.end_header_id, v.eot_id = 31014, 31015, 30999
  config.magvit.codebook_bits = 9
  # One head chunk for the whole gathered buffer (8 x 256 x 0.6 positions, ~160 MB of fp32 logits): no recomputation
  # of the LM head in the backward pass, 1.1x on the train step on a 2-core CPU.
  config.loss.head_chunk = 256
  return config
