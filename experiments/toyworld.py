"""ToyWorld stages on CPU: the whole MMaDA recipe at toy size (mmada_jax/data/toyworld.py).

Variants (`experiments/toyworld.py:<stage>`):
  stage1   pre-training: t2i + plain text (lm, Σ CE/p ÷ (B·L)) + image QA (mmu); coefficients 1.0 / 0.1 / 1.0 (§4.6)
  cot      Mix-CoT: t2i + chat/CoT text (answer-length normalisation, 32 rows of 112) + CoT visual QA;
           coefficients 1.0 / 0.5 / 0.5
  text     stage1 with text only (no image tokenizer needed)
  chat     the Mix-CoT chat/CoT word problems alone, 64 rows of 112 per step: a text phase between Mix-CoT runs (the
           image rows hold ~70 % of a Mix-CoT step's tokens; text needs far more examples than they leave room for)
  mmu      the Mix-CoT visual questions (CoT answers) alone, 32 rows per step: an image-understanding phase between
           Mix-CoT runs, as `chat` is for text

Images are 64 px, tokenized by the ToyWorld MAGVIT-v2 of `experiments/magvit_toyworld.py` (its `magvit` section is
used as is; 16 x 16 = 256 codes of 10 bits); set `--config.data.image_tokenizer=PATH` to its checkpoint
(`mmada-jax demo` trains one). The backbone is a 4-layer, d_model 128 LLaDA. Text positions S (data.max_text_len): 56,
and 120 for `cot`, whose CoT instruction alone takes 46 (a visual question whose answer does not fit is skipped).
"""

import os

from mmada_jax.config import get_base_config, load_module
from mmada_jax.tokens.vocab import apply_toy_vocab

HERE = os.path.dirname(os.path.abspath(__file__))


VARIANTS = ("stage1", "cot", "text", "chat", "mmu")


def get_config(arg: str | None = None):
  stage = arg or "stage1"
  if stage not in VARIANTS:
    raise ValueError(f"toyworld: unknown stage {stage!r} ({', '.join(VARIANTS)})")
  config = get_base_config()
  config.name = f"toyworld_{stage}"
  tokenizer = load_module(os.path.join(HERE, "magvit_toyworld.py")).get_config()
  config.magvit = tokenizer.magvit  # must describe the image tokenizer checkpoint given in data.image_tokenizer
  apply_toy_vocab(config, codebook_size=tokenizer.vocab.codebook_size,
                  num_image_tokens=tokenizer.vocab.num_image_tokens)
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_hidden = 4, 128, 4, 4, 384
  m.scan_layers, m.remat_policy = False, "none"  # unrolled is fastest on CPU at this size
  d = config.data
  d.max_text_len = 56  # text positions S: the longest visual question + answer (a 4-object caption) is 54 with BOS/EOS
  d.toyworld.image_size = 64
  d.batch_size_t2i, d.batch_size_lm, d.batch_size_mmu = 8, 8, 8
  o = config.optimizer
  o.learning_rate, o.warmup_steps, o.decay_steps, o.min_lr_scale = 1e-3, 30, 300, 0.1
  t = config.train
  t.steps, t.log_every, t.eval_every = 300, 10, 50
  config.checkpoint.save_every_steps = 100
  st = config.sampling  # ToyWorld answers are short: 64 tokens in 2 blocks of 32, one token per step
  st.text.gen_length, st.text.block_length, st.text.steps = 64, 32, 64
  st.image.timesteps, st.image.guidance_scale = 12, 2.0
  lc = config.loss
  # Train with the attention the samplers use (hard-masked [iPAD] keys of short prompts). The official float bias only
  # down-weights them; a model trained from scratch that way, then sampled with the hard mask, draws noise.
  lc.attention = "pair_mask"
  if stage in ("cot", "chat", "mmu"):
    lc.coeff_t2i, lc.coeff_lm, lc.coeff_mmu = 1.0, 0.5, 0.5
    lc.lm_normalisation = "answer"
    d.lm_sources, d.mmu_sources = ("toyworld:chat",), ("toyworld:cot",)
    d.max_text_len = 120  # the CoT instruction + question + <think> answer: up to 118 positions with BOS/EOS
    # Chat rows are at most 103 positions: lm rows of 112 (their own forward pass) instead of L = 379, which were
    # three-quarters EOS padding; the saved compute buys 4x the word problems per step.
    d.lm_seq_len, d.batch_size_lm = 112, 32
    # Their answers fill 23-34 positions: the text task is evaluated with the RL rollout's 16 tokens in blocks of 8
    # (sampling.text's 64 tokens, which the visual questions' captions need, are out of distribution for it).
    st.eval_text.gen_length, st.eval_text.block_length, st.eval_text.steps = 16, 8, 16
    o.learning_rate, o.warmup_steps = 5e-4, 20
  if stage in ("text", "chat"):
    d.batch_size_t2i, d.batch_size_mmu = 0, 0
  if stage == "chat":
    d.batch_size_lm = 64
  if stage == "mmu":
    d.batch_size_t2i, d.batch_size_lm, d.batch_size_mmu = 0, 0, 32
  return config
