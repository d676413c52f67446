"""Validation of a whole config: `validate(config)` checks every section before anything is built and raises
`ConfigError` naming every key at fault. Also the derived facts `head_dim` and `row_lengths`."""

from __future__ import annotations

# parallel.rules and tokens.prompting import no config module: the dependency goes one way (no cycle).
from mmada_jax.config.defaults import ATTENTION_IMPLS, DTYPES, MATMUL_PRECISIONS, REMAT_POLICIES, ConfigDict
from mmada_jax.config.errors import ConfigError
from mmada_jax.parallel import rules
from mmada_jax.tokens import prompting


def _require(cond: bool, key: str, msg: str, errors: list[str]) -> None:
  if not cond:
    errors.append(f"{key}: {msg}")


def row_lengths(config: ConfigDict) -> dict[str, int]:
  """`{task: length of its training rows}`: L = S + N + 3 (`Prompter.seq_len`) for t2i and mmu, `data.lm_seq_len`
  (0 = L) for lm."""
  length = prompting.Prompter.from_config(config).seq_len
  return {"t2i": length, "lm": int(config.data.lm_seq_len) or length, "mmu": length}


def head_dim(model: ConfigDict) -> int:
  """Per-head width: `model.head_dim`, or d_model // num_heads when it is 0."""
  return int(model.head_dim) or int(model.d_model) // int(model.num_heads)


def _validate_model(m: ConfigDict, errors: list[str]) -> None:
  for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_hidden", "vocab_size"):
    _require(isinstance(m[key], int) and m[key] > 0, f"model.{key}", f"must be a positive integer, got {m[key]!r}",
             errors)
  if errors:
    return
  _require(m.head_dim >= 0, "model.head_dim", f"must be >= 0 (0 = d_model // num_heads), got {m.head_dim}", errors)
  if m.head_dim == 0:
    _require(m.d_model % m.num_heads == 0, "model.d_model",
             f"{m.d_model} is not divisible by model.num_heads={m.num_heads} (set model.head_dim explicitly)", errors)
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}", errors)
  hd = head_dim(m)
  _require(hd % 2 == 0, "model.head_dim", f"rotary embedding needs an even head dimension, got {hd}", errors)
  _require(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}", errors)
  _require(m.norm_eps > 0, "model.norm_eps", f"must be positive, got {m.norm_eps}", errors)
  for key in ("param_dtype", "dtype"):
    _require(m[key] in DTYPES, f"model.{key}", f"must be one of {DTYPES}, got {m[key]!r}", errors)
  _require(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
           f"must be one of {REMAT_POLICIES}, got {m.remat_policy!r}", errors)
  _require(m.matmul_precision in MATMUL_PRECISIONS, "model.matmul_precision",
           f"must be one of {MATMUL_PRECISIONS}, got {m.matmul_precision!r}", errors)
  impl = m.get("attention_impl", "einsum")
  _require(impl in ATTENTION_IMPLS, "model.attention_impl", f"must be one of {ATTENTION_IMPLS}, got {impl!r}", errors)
  _require(impl != "cudnn" or m.dtype in ("bfloat16", "float16"), "model.attention_impl",
           f"'cudnn' needs model.dtype bfloat16 or float16 (the fused kernel has no fp32 mode), got {m.dtype!r}",
           errors)


SPECIAL_ID_KEYS = ("mask_id", "bos_id", "eos_id", "pad_id", "soi_id", "eoi_id", "t2i_id", "mmu_id", "ipad_id",
                   "start_header_id", "end_header_id", "eot_id")


def _validate_vocab(v: ConfigDict, model: ConfigDict, errors: list[str]) -> None:
  rows = model.vocab_size
  for key in SPECIAL_ID_KEYS:
    _require(isinstance(v[key], int) and 0 <= v[key] < v.text_vocab_size, f"vocab.{key}",
             f"{v[key]!r} is not a text id in [0, vocab.text_vocab_size={v.text_vocab_size})", errors)
  _require(v.codebook_size >= 0, "vocab.codebook_size", f"must be >= 0 (0 = text-only model), got {v.codebook_size}",
           errors)
  _require(v.image_offset >= v.text_vocab_size, "vocab.image_offset",
           f"image ids ({v.image_offset}+code) overlap the text ids [0, {v.text_vocab_size})", errors)
  _require(v.image_offset + v.codebook_size <= rows, "vocab.image_offset",
           f"image ids end at vocab.image_offset + vocab.codebook_size = {v.image_offset + v.codebook_size}, beyond "
           f"the model.vocab_size={rows} rows of the embedding", errors)
  _require(v.num_image_tokens > 0, "vocab.num_image_tokens", f"must be positive, got {v.num_image_tokens}", errors)


def _validate_magvit(g: ConfigDict, vocab: ConfigDict, errors: list[str]) -> None:
  for side in ("encoder", "decoder"):
    mult, blocks = g[f"{side}_channel_mult"], g[f"{side}_num_res_blocks"]
    _require(len(mult) == len(blocks) and len(mult) > 0, f"magvit.{side}_num_res_blocks",
             f"needs one entry per level of magvit.{side}_channel_mult ({len(mult)} levels), got {len(blocks)}", errors)
  _require(len(g.encoder_channel_mult) == len(g.decoder_channel_mult), "magvit.decoder_channel_mult",
           "encoder and decoder must have the same number of levels", errors)
  for mult_key in ("encoder_channel_mult", "decoder_channel_mult"):
    for c in g[mult_key]:
      _require((g.channels * c) % g.norm_groups == 0, f"magvit.{mult_key}",
               f"width {g.channels}*{c} is not divisible by magvit.norm_groups={g.norm_groups}", errors)
  factor = 2 ** (len(g.encoder_channel_mult) - 1)
  _require(g.resolution % factor == 0, "magvit.resolution",
           f"{g.resolution} is not divisible by the downsampling factor {factor}", errors)
  _require(vocab.codebook_size == 0 or 2 ** g.codebook_bits == vocab.codebook_size, "magvit.codebook_bits",
           f"2**{g.codebook_bits} codes != vocab.codebook_size={vocab.codebook_size}", errors)
  for key in ("param_dtype", "dtype"):
    _require(g[key] in DTYPES, f"magvit.{key}", f"must be one of {DTYPES}, got {g[key]!r}", errors)
  for side in ("encoder", "decoder"):
    _require(all(isinstance(b, int) and b >= 1 for b in g[f"{side}_num_res_blocks"]), f"magvit.{side}_num_res_blocks",
             f"every level needs at least one residual block, got {tuple(g[f'{side}_num_res_blocks'])}", errors)
  _require(all(isinstance(r, int) and r > 0 for r in g.attn_resolutions), "magvit.attn_resolutions",
           f"must be positive integers (feature-map sizes), got {tuple(g.attn_resolutions)}", errors)
  _require(g.matmul_precision in MATMUL_PRECISIONS, "magvit.matmul_precision",
           f"must be one of {MATMUL_PRECISIONS}, got {g.matmul_precision!r}", errors)
  _require(g.resize_mode in ("crop", "squash"), "magvit.resize_mode",
           f"must be 'crop' or 'squash', got {g.resize_mode!r}", errors)
  for key in ("beta", "commit_multiplier", "entropy_multiplier"):
    _require(g[key] >= 0, f"magvit.{key}", f"must be >= 0, got {g[key]}", errors)
  t = g.train
  for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep", "eval_images"):
    _require(isinstance(t[key], int) and t[key] > 0, f"magvit.train.{key}",
             f"must be a positive integer, got {t[key]!r}", errors)
  _require(t.learning_rate > 0 and t.warmup_steps >= 0 and t.weight_decay >= 0 and t.grad_clip >= 0,
           "magvit.train", "learning_rate must be > 0; warmup_steps, weight_decay, grad_clip >= 0", errors)
  _require(t.recon_loss in ("l1", "l2"), "magvit.train.recon_loss", f"must be 'l1' or 'l2', got {t.recon_loss!r}",
           errors)


DATA_SOURCE_KINDS = ("toyworld", "tfds", "jsonl", "gsm8k", "parquet", "images", "wds", "llava",
                     "tokens")  # data/sources.py


def _validate_data(d: ConfigDict, vocab: ConfigDict, errors: list[str]) -> None:
  _require(isinstance(d.max_text_len, int) and d.max_text_len >= 2, "data.max_text_len",
           f"must be an integer >= 2 (BOS and EOS), got {d.max_text_len!r}", errors)
  _require(0.0 <= d.cond_dropout_prob <= 1.0, "data.cond_dropout_prob", f"must be in [0, 1], got {d.cond_dropout_prob}",
           errors)
  _require(isinstance(d.lm_seq_len, int) and (d.lm_seq_len == 0 or d.lm_seq_len >= 2), "data.lm_seq_len",
           f"must be 0 (= L) or an integer >= 2 (BOS and EOS), got {d.lm_seq_len!r}", errors)
  for key in ("lm_max_chars", "read_threads", "prefetch_buffer"):
    _require(isinstance(d[key], int) and d[key] >= 0, f"data.{key}", f"must be an integer >= 0, got {d[key]!r}", errors)
  sizes = {t: d[f"batch_size_{t}"] for t in ("t2i", "lm", "mmu")}
  for task, rows in sizes.items():
    _require(isinstance(rows, int) and rows >= 0, f"data.batch_size_{task}", f"must be an integer >= 0, got {rows!r}",
             errors)
    specs, weights = tuple(d[f"{task}_sources"]), tuple(d[f"{task}_weights"])
    if isinstance(rows, int) and rows > 0:
      _require(len(specs) > 0 and len(specs) == len(weights), f"data.{task}_weights",
               f"needs one weight per source of data.{task}_sources ({len(specs)}), got {len(weights)}", errors)
      _require(all(w >= 0 for w in weights) and sum(weights) > 0, f"data.{task}_weights",
               f"must be >= 0 with a positive sum, got {weights}", errors)
    for spec in specs:
      _require(str(spec).partition(":")[0] in DATA_SOURCE_KINDS, f"data.{task}_sources",
               f"{spec!r} is not 'kind:argument' with kind in {DATA_SOURCE_KINDS}", errors)
  _require(any(isinstance(r, int) and r > 0 for r in sizes.values()), "data.batch_size_t2i",
           "data.batch_size_t2i, batch_size_lm and batch_size_mmu are all 0", errors)
  t = d.toyworld
  _require(t.grid in (2, 3), "data.toyworld.grid", f"must be 2 or 3, got {t.grid}", errors)
  if t.grid in (2, 3):
    _require(t.image_size / t.grid >= 16, "data.toyworld.image_size",
             f"{t.image_size} px over a {t.grid}x{t.grid} grid leaves cells under 16 px", errors)
    _require(1 <= t.max_objects <= t.grid ** 2, "data.toyworld.max_objects",
             f"must be in [1, {t.grid ** 2}] for grid={t.grid}, got {t.max_objects}", errors)
  for key in ("num_train", "num_validation", "num_test"):
    _require(isinstance(t[key], int) and t[key] >= 0, f"data.toyworld.{key}",
             f"must be an integer >= 0, got {t[key]!r}", errors)


def _validate_train(config: ConfigDict, errors: list[str]) -> None:
  o, t, c = config.optimizer, config.train, config.checkpoint
  _require(o.learning_rate > 0, "optimizer.learning_rate", f"must be positive, got {o.learning_rate}", errors)
  _require(o.schedule in ("cosine", "linear", "constant"), "optimizer.schedule",
           f"must be 'cosine', 'linear' or 'constant', got {o.schedule!r}", errors)
  _require(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}", errors)
  _require(o.decay_steps >= o.warmup_steps, "optimizer.decay_steps",
           f"{o.decay_steps} is before the end of optimizer.warmup_steps={o.warmup_steps}", errors)
  _require(0.0 <= o.min_lr_scale <= 1.0, "optimizer.min_lr_scale", f"must be in [0, 1], got {o.min_lr_scale}", errors)
  _require(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, "optimizer.b1", f"betas must be in [0, 1), got {o.b1}, {o.b2}",
           errors)
  _require(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0, got {o.grad_clip}", errors)
  _require(o.mu_dtype in DTYPES, "optimizer.mu_dtype", f"must be one of {DTYPES}, got {o.mu_dtype!r}", errors)
  _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}", errors)
  _require(t.micro_batches >= 1, "train.micro_batches", f"must be >= 1, got {t.micro_batches}", errors)
  for task in ("t2i", "lm", "mmu"):
    rows = config.data.get(f"batch_size_{task}", 0)
    _require(rows % t.micro_batches == 0, f"data.batch_size_{task}",
             f"{rows} rows cannot be split into train.micro_batches={t.micro_batches} equal micro-batches", errors)
  _require(t.log_every > 0, "train.log_every", f"must be positive, got {t.log_every}", errors)
  _require(c.save_every_steps > 0, "checkpoint.save_every_steps", f"must be positive, got {c.save_every_steps}", errors)
  _require(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}", errors)
  _require(c.manifest in ("sha256", "size", "none"), "checkpoint.manifest",
           f"must be 'sha256', 'size' or 'none', got {c.manifest!r}", errors)
  _require(isinstance(t.max_nonfinite_steps, int) and t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps",
           f"must be an integer >= 0 (0 = never stop), got {t.max_nonfinite_steps!r}", errors)
  _require(t.loss_spike_factor == 0 or t.loss_spike_factor > 1, "train.loss_spike_factor",
           f"must be 0 (off) or > 1, got {t.loss_spike_factor}", errors)
  _require(isinstance(t.loss_spike_window, int) and t.loss_spike_window >= 1, "train.loss_spike_window",
           f"must be an integer >= 1, got {t.loss_spike_window!r}", errors)
  _require(isinstance(t.sample_every, int) and t.sample_every >= 0, "train.sample_every",
           f"must be an integer >= 0 (0 = off), got {t.sample_every!r}", errors)
  _require(t.sample_count >= 1, "train.sample_count", f"must be >= 1, got {t.sample_count}", errors)
  if t.sample_every:
    other = [f"data.{k}_sources={tuple(config.data[k + '_sources'])}" for k in ("t2i", "lm", "mmu")
             if config.data.get(f"batch_size_{k}", 0) and
             not all(str(s).startswith(("toyworld", "tokens:")) for s in config.data[k + "_sources"])]
    _require(not other, "train.sample_every", "generation evals during training score ToyWorld held-out answers; not "
             f"ToyWorld data: {', '.join(other)} (set train.sample_every=0)", errors)


def _validate_loss(lc: ConfigDict, errors: list[str]) -> None:
  _require(0.0 < lc.text_eps < 1.0, "loss.text_eps", f"must be in (0, 1), got {lc.text_eps}", errors)
  _require(lc.image_schedule in ("cosine", "linear"), "loss.image_schedule",
           f"must be 'cosine' or 'linear', got {lc.image_schedule!r}", errors)
  _require(0.0 <= lc.image_min_mask_rate <= 1.0, "loss.image_min_mask_rate",
           f"must be in [0, 1], got {lc.image_min_mask_rate}", errors)
  for task in ("t2i", "lm", "mmu"):
    _require(lc[f"coeff_{task}"] >= 0, f"loss.coeff_{task}", f"must be >= 0, got {lc[f'coeff_{task}']}", errors)
  _require(lc.lm_normalisation in ("tokens", "answer"), "loss.lm_normalisation",
           f"must be 'tokens' or 'answer', got {lc.lm_normalisation!r}", errors)
  _require(lc.attention in ("float_bias", "key_mask", "pair_mask", "none"), "loss.attention",
           f"must be 'float_bias', 'key_mask', 'pair_mask' or 'none', got {lc.attention!r}", errors)
  _require(lc.head in ("gather", "chunked", "full"), "loss.head",
           f"must be 'gather', 'chunked' or 'full', got {lc.head!r}", errors)
  _require(isinstance(lc.head_chunk, int) and lc.head_chunk >= 1, "loss.head_chunk",
           f"must be an integer >= 1, got {lc.head_chunk!r}", errors)
  _require(0.0 < lc.head_capacity <= 1.0, "loss.head_capacity", f"must be in (0, 1], got {lc.head_capacity}", errors)
  _require(isinstance(lc.head_groups, int) and lc.head_groups >= 0, "loss.head_groups",
           f"must be an integer >= 0 (0 = one group per device), got {lc.head_groups!r}", errors)


def _validate_sampling(s: ConfigDict, errors: list[str]) -> None:
  t, im = s.text, s.image
  for key in ("gen_length", "block_length", "steps"):
    _require(isinstance(t[key], int) and t[key] > 0, f"sampling.text.{key}", f"must be a positive integer, got "
             f"{t[key]!r}", errors)
  if all(isinstance(t[k], int) and t[k] > 0 for k in ("gen_length", "block_length", "steps")):
    _require(t.gen_length % t.block_length == 0, "sampling.text.block_length",
             f"sampling.text.gen_length={t.gen_length} is not a multiple of block_length={t.block_length}", errors)
    _require(t.threshold > 0 or t.steps % max(1, t.gen_length // t.block_length) == 0, "sampling.text.steps",
             f"{t.steps} is not a multiple of the number of blocks {t.gen_length // t.block_length}", errors)
  e = s.eval_text
  for key in ("gen_length", "block_length", "steps"):
    _require(isinstance(e[key], int) and e[key] >= 0, f"sampling.eval_text.{key}", f"must be an integer >= 0 (0 = "
             f"sampling.text.{key}), got {e[key]!r}", errors)
  if all(isinstance(e[k], int) and isinstance(t[k], int) for k in ("gen_length", "block_length", "steps")):
    g, b, n = (e[k] or t[k] for k in ("gen_length", "block_length", "steps"))
    _require(b > 0 and g % b == 0, "sampling.eval_text.block_length",
             f"the text task's gen_length={g} is not a multiple of its block_length={b}", errors)
    _require(b <= 0 or t.threshold > 0 or n % max(1, g // b) == 0, "sampling.eval_text.steps",
             f"the text task's steps={n} is not a multiple of its number of blocks {g // max(b, 1)}", errors)
  _require(t.remasking in ("low_confidence", "random"), "sampling.text.remasking",
           f"must be 'low_confidence' or 'random', got {t.remasking!r}", errors)
  _require(0.0 <= t.threshold < 1.0, "sampling.text.threshold", f"must be in [0, 1) (0 = off), got {t.threshold}",
           errors)
  _require(isinstance(im.timesteps, int) and im.timesteps > 0, "sampling.image.timesteps",
           f"must be a positive integer, got {im.timesteps!r}", errors)
  for sec, key in (("text", "temperature"), ("text", "cfg_scale"), ("image", "guidance_scale"),
                   ("image", "temperature"), ("image", "sample_temperature")):
    _require(s[sec][key] >= 0, f"sampling.{sec}.{key}", f"must be >= 0, got {s[sec][key]}", errors)
  _require(im.noise_schedule in ("cosine", "linear"), "sampling.image.noise_schedule",
           f"must be 'cosine' or 'linear', got {im.noise_schedule!r}", errors)
  _require(im.temperature_annealing in ("cumulative", "linear"), "sampling.image.temperature_annealing",
           f"must be 'cumulative' or 'linear', got {im.temperature_annealing!r}", errors)


RL_CHOICES = {"task": ("text", "t2i"), "prompt_source": ("toyworld",), "estimator": ("unigrpo", "d1"),
              "schedule": ("algorithm1", "stratified_wrap", "iid", "range"), "mask_law": ("exact", "bernoulli"),
              "loss_tail": ("first_eos", "all"), "normalisation": ("sample", "token"),
              "seq_normaliser": ("masked", "response"), "logp_mode": ("fold", "vmap", "map"),
              "remasking": ("low_confidence", "random")}


def _validate_rl(config: ConfigDict, errors: list[str]) -> None:
  r = config.rl
  for key, choices in RL_CHOICES.items():
    _require(r[key] in choices, f"rl.{key}", f"must be one of {choices}, got {r[key]!r}", errors)
  for key in ("steps", "prompts_per_step", "group_size", "inner_steps", "masks_per_step", "schedule_T",
              "micro_batches", "prompt_len", "gen_length", "block_length", "rollout_steps", "log_every",
              "dump_count", "oversample"):
    _require(isinstance(r[key], int) and r[key] >= 1, f"rl.{key}", f"must be an integer >= 1, got {r[key]!r}", errors)
  for key in ("seed", "eval_prompts", "eval_every", "eval_samples", "dump_every"):
    _require(isinstance(r[key], int) and r[key] >= 0, f"rl.{key}", f"must be an integer >= 0, got {r[key]!r}", errors)
  by_choices = ("total", "accuracy", *tuple(r.rewards))
  _require(r.oversample_by in by_choices, "rl.oversample_by", f"must be one of {by_choices}, got {r.oversample_by!r}",
           errors)
  rows = r.prompts_per_step * r.group_size
  _require(rows % max(r.micro_batches, 1) == 0, "rl.micro_batches",
           f"rl.prompts_per_step * rl.group_size = {rows} rows cannot be split into {r.micro_batches} micro-batches",
           errors)
  if isinstance(r.block_length, int) and r.block_length > 0:
    _require(r.gen_length % r.block_length == 0, "rl.block_length",
             f"rl.gen_length={r.gen_length} is not a multiple of rl.block_length={r.block_length}", errors)
    blocks = max(r.gen_length // r.block_length, 1)
    _require(r.rollout_steps % blocks == 0, "rl.rollout_steps",
             f"{r.rollout_steps} is not a multiple of the number of blocks {blocks}", errors)
  lo, hi = tuple(r.ratio_range) if len(tuple(r.ratio_range)) == 2 else (-1.0, -1.0)
  _require(0.0 <= lo <= hi <= 1.0, "rl.ratio_range", f"must be (lo, hi) with 0 <= lo <= hi <= 1, got "
           f"{tuple(r.ratio_range)}", errors)
  _require(0.0 <= r.p_min <= 1.0, "rl.p_min", f"must be in [0, 1], got {r.p_min}", errors)
  _require(0.0 <= r.d1_prompt_mask_prob < 1.0, "rl.d1_prompt_mask_prob", f"must be in [0, 1), got "
           f"{r.d1_prompt_mask_prob}", errors)
  _require(0.0 <= r.clip_low < 1.0 and r.clip_high >= 0.0, "rl.clip_low",
           f"need 0 <= clip_low < 1 and clip_high >= 0, got {r.clip_low}, {r.clip_high}", errors)
  for key in ("kl_beta", "adv_eps", "logratio_clamp", "temperature"):
    _require(r[key] >= 0, f"rl.{key}", f"must be >= 0, got {r[key]}", errors)
  _require(len(tuple(r.rewards)) > 0 and len(tuple(r.rewards)) == len(tuple(r.reward_weights)), "rl.reward_weights",
           f"needs one weight per component of rl.rewards {tuple(r.rewards)}, got {tuple(r.reward_weights)}", errors)


def _validate_layouts(config: ConfigDict, errors: list[str]) -> None:
  """Image layouts: an image encoded online must give exactly vocab.num_image_tokens codes (the layout's N)."""
  d, g, v = config.data, config.magvit, config.vocab
  images = any(isinstance(d[f"batch_size_{t}"], int) and d[f"batch_size_{t}"] > 0 for t in ("t2i", "mmu"))
  if not (d.image_tokenizer and images and len(g.encoder_channel_mult) > 0):
    return
  side = g.resolution // 2 ** (len(g.encoder_channel_mult) - 1)
  _require(side * side == v.num_image_tokens, "vocab.num_image_tokens",
           f"{v.num_image_tokens} image positions in every layout, but the image tokenizer of data.image_tokenizer "
           f"(magvit.resolution={g.resolution}, {len(g.encoder_channel_mult)} levels) makes {side}x{side} = "
           f"{side * side} codes per image", errors)


def _validate_preset(s: ConfigDict, errors: list[str]) -> None:
  """The chosen preset itself (code data in parallel/rules.py) may only name known mesh and logical axes."""
  preset = rules.PRESETS.get(s.preset)
  if preset is None:
    return  # reported by rules.validate_sharding_config
  for level in ("ici", "dcn"):
    bad = sorted(set(preset.get(level, {})) - set(rules.MESH_AXES))
    if bad:
      errors.append(f"sharding.preset: preset {s.preset!r} gives {level} sizes to unknown mesh axes {bad} (mesh axes: "
                    f"{list(rules.MESH_AXES)})")
  for name, value in preset.get("rules", {}).items():
    if name not in rules.LOGICAL_AXES:
      errors.append(f"sharding.preset: preset {s.preset!r} has a rule for unknown logical axis {name!r}")
    bad = [a for a in rules.parse_rule(value) if a not in rules.MESH_AXES]
    if bad:
      errors.append(f"sharding.preset: preset {s.preset!r} maps {name!r} to unknown mesh axes {bad} (mesh axes: "
                    f"{list(rules.MESH_AXES)})")


def validate(config: ConfigDict) -> ConfigDict:
  """Checks the whole config; raises ConfigError listing every problem with its key. Returns the config."""
  errors: list[str] = []
  for section in ("model", "vocab", "sharding", "magvit", "data", "loss", "optimizer", "train", "checkpoint",
                  "sampling"):
    if section not in config:
      errors.append(f"{section}: section missing (start experiment files from mmada_jax.config.get_base_config())")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  _validate_model(config.model, errors)
  if not errors:
    _validate_vocab(config.vocab, config.model, errors)
  _validate_magvit(config.magvit, config.vocab, errors)
  _validate_data(config.data, config.vocab, errors)
  _validate_layouts(config, errors)
  _validate_loss(config.loss, errors)
  _validate_train(config, errors)
  _validate_sampling(config.sampling, errors)
  if "rl" in config:
    _validate_rl(config, errors)
  errors.extend(rules.validate_sharding_config(config.sharding))
  _validate_preset(config.sharding, errors)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return config

