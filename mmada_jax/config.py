"""The base configuration: every key that code reads lives here, with its default.

Experiment files in `experiments/` start from `get_base_config()` and change values; they never add keys (the config is
locked). `validate(config)` checks the whole config before anything is built and raises `ConfigError` naming the keys at
fault.

Sections:
  model       backbone shape, dtypes, layer stacking and rematerialisation
  vocab       token ids: mask, image offset, codebook size, special tokens (Decision 4: never hard-coded in code)
  sharding    mesh axes, preset and rule overrides
  magvit      the MAGVIT-v2 image tokenizer
  data        data sources, sequence layouts, batch composition
  loss        the training objective: on-device corruption, the three losses, their weights, the LM-head strategy
  optimizer   AdamW, clipping, learning-rate schedule
  train       the training loop (steps, gradient accumulation, logging, initialisation)
  checkpoint  where/how checkpoints are written
  sampling    sampler defaults: text (semi-autoregressive) and text-to-image (MaskGIT)
  rl          UniGRPO reinforcement learning: rollouts, rewards, mask-ratio schedule, clipped objective
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj", "save_out_proj")
MATMUL_PRECISIONS = ("default", "high", "highest")


class ConfigError(ValueError):
  """A configuration value is missing, malformed or contradicts another one."""


def model_section() -> ConfigDict:
  """Backbone hyper-parameters (LLaDA-8B field names in comments)."""
  m = ConfigDict()
  m.num_layers = 32  # n_layers
  m.d_model = 4096  # d_model
  m.num_heads = 32  # n_heads
  m.num_kv_heads = 32  # n_kv_heads (== num_heads: plain multi-head attention, as LLaDA-8B)
  m.head_dim = 0  # 0 = d_model // num_heads
  m.mlp_hidden = 12288  # mlp_hidden_size (width of ff_proj / up_proj)
  m.vocab_size = 134656  # rows of the embedding and of the LM head (embedding_size)
  m.rope_theta = 500000.0
  m.norm_eps = 1e-5  # rms_norm_eps
  m.param_dtype = "float32"  # dtype parameters are stored in
  m.dtype = "float32"  # compute dtype of matmuls and activations (norm statistics, RoPE, softmax stay fp32)
  m.matmul_precision = "default"  # lax.Precision for matmuls; "highest" forces full fp32 on TPU/GPU
  m.scan_layers = True  # stack layers with nn.scan (parameters get a leading `layers` axis)
  m.remat_policy = "none"  # activation rematerialisation per layer, one of REMAT_POLICIES
  # attention kernel: "einsum" (ours: two einsums, fp32 scores and softmax; fastest on CPU), "xla" or "cudnn"
  # (`jax.nn.dot_product_attention`; cudnn = the fused flash kernel on NVIDIA GPUs, bf16/fp16 compute only)
  m.attention_impl = "einsum"
  return m


def vocab_section() -> ConfigDict:
  """Token ids of the official MMaDA-8B vocabulary (specs/mmada-official.md §0.1, §1.7)."""
  v = ConfigDict()
  v.text_vocab_size = 126349  # len(tokenizer): ids 0 .. 126348 are text
  v.llm_vocab_size = 126464  # rows of LLaDA before the image rows were added (official `llm_vocab_size`)
  v.codebook_size = 8192  # image codes (0 = a text-only model such as LLaDA)
  v.image_offset = 126349  # image token id = image_offset + code (len(tokenizer), not llm_vocab_size)
  v.mask_id = 126336  # [MASK], shared by text and image positions
  v.bos_id = 126080  # <|startoftext|> / <|sot|>
  v.eos_id = 126081  # <|endoftext|> / <|eot|>, also the text padding id
  v.pad_id = 126081
  v.soi_id = 126084  # <|soi|>
  v.eoi_id = 126085  # <|eoi|>
  v.sov_id = 126086
  v.eov_id = 126087
  v.t2i_id = 126088  # <|t2i|>
  v.mmu_id = 126089  # <|mmu|>
  v.t2v_id = 126090
  v.v2v_id = 126091
  v.lvg_id = 126092
  v.ipad_id = 126093  # [iPAD]: left padding of the t2i text prefix
  v.r2i_id = 126094
  v.start_header_id = 126346  # <|start_header_id|>
  v.end_header_id = 126347  # <|end_header_id|>
  v.eot_id = 126348  # <|eot_id|> (end of a chat turn)
  v.num_image_tokens = 256  # image tokens per image (256 at 256 px, 1024 at 512 px)
  # Token strings that appear inside text (chat headers, CoT markers). The tokenizer wrapper checks that the special
  # ones map to the ids above (mmada-official.md §3.4, §3.5, §9.2); the <think> markers are ordinary text officially.
  v.mask_token = "<|mdm_mask|>"
  v.start_header_token = "<|start_header_id|>"
  v.end_header_token = "<|end_header_id|>"
  v.eot_token = "<|eot_id|>"
  v.think_open = "<think>"
  v.think_close = "</think>"
  return v


def sharding_section() -> ConfigDict:
  """Mesh and logical-axis rules. `preset` picks mesh axes + rules; `rule_overrides` replaces single rules."""
  s = ConfigDict()
  s.preset = "fsdp"
  # Per mesh axis size over ICI (within a slice) and DCN (across slices): 0 = the preset's size, -1 = fill with the
  # remaining devices (at most one -1 per level after merging with the preset), otherwise the size itself.
  s.ici = ConfigDict({"data": 0, "fsdp": 0, "tensor": 0})
  s.dcn = ConfigDict({"data": 0, "fsdp": 0, "tensor": 0})
  # Logical axis name -> mesh axis (str), tuple of mesh axes, or "" for replicated; merged over the preset's rules.
  s.rule_overrides = ConfigDict()
  return s


def magvit_section() -> ConfigDict:
  """MAGVIT-v2 image tokenizer (official Show-o `showlab/magvitv2` architecture by default)."""
  g = ConfigDict()
  g.resolution = 256
  g.in_channels = 3
  g.channels = 128
  g.encoder_channel_mult = (1, 2, 2, 4, 4)
  g.encoder_num_res_blocks = (4, 3, 4, 3, 4)
  g.decoder_channel_mult = (1, 1, 2, 2, 4)
  g.decoder_num_res_blocks = (4, 4, 3, 4, 3)
  g.codebook_bits = 13  # z_channels: 2**13 = 8192 codes
  g.norm_groups = 32
  g.norm_eps = 1e-6
  # Feature-map sizes (relative to `resolution`, as the official constructor computes them) that get an attention block
  # after every residual block of that level. The official model lists 5, which never occurs: only the mid attention.
  g.attn_resolutions = (5,)
  g.param_dtype = "float32"
  g.dtype = "float32"
  g.matmul_precision = "default"  # "highest" for fp32 parity on TPU/GPU
  g.resize_mode = "crop"  # image I/O: "crop" (shorter side, centre crop) or "squash" (spec §2.6)
  # LFQ training losses (official LFQuantizer defaults, parity README §9).
  g.beta = 0.25
  g.commit_multiplier = 0.1
  g.entropy_multiplier = 0.1
  # Training from scratch (mmada_jax/models/magvit_train.py).
  g.train = ConfigDict()
  g.train.steps = 2000
  g.train.batch_size = 32  # global batch, split over the data-parallel devices
  g.train.learning_rate = 1e-3
  g.train.warmup_steps = 100
  g.train.weight_decay = 1e-4
  g.train.grad_clip = 1.0
  g.train.recon_loss = "l2"  # "l2" or "l1" on [-1, 1] pixels (l1 learnt ToyWorld colours far more slowly)
  g.train.recon_weight = 1.0
  g.train.entropy_weight = 1.0  # scales the (already multiplied) LFQ entropy loss
  g.train.commit_weight = 1.0  # scales the (already multiplied) LFQ commitment loss
  g.train.log_every = 50
  g.train.checkpoint_every = 500
  g.train.keep = 2  # checkpoints kept
  g.train.eval_images = 256  # held-out images for the PSNR at the end
  return g


def data_section() -> ConfigDict:
  """Data sources, sequence layouts and batch composition (filled in by the data pipeline)."""
  d = ConfigDict()
  d.max_text_len = 128  # S: text tokens of the t2i prefix / mmu text part (official `max_seq_length`)
  # Sequence layouts (mmada-official.md §3, quirks §8).
  d.cond_dropout_prob = 0.1  # t2i: probability of replacing the caption by the null prompt (§3.1)
  d.mmu_literal_eot = True  # §8.10: mmu training prompts end the user turn with the literal text "<eot_id>" (official)
  d.valid_mask_all_ones = True  # §3.3: lm/mmu valid mask built after padding = all ones (official); False: real tokens
  d.lm_max_chars = 8000  # pre-training text: random window of this many characters, newlines removed (§4.6); 0 = off
  d.lm_seq_len = 0  # length of the lm rows; 0 = L = S + N + 3, the length of every other row (official). Shorter lm
  #                   rows (chat / CoT text) skip the EOS padding up to L; the loss then runs one forward pass per length
  d.drop_long_captions = False  # t2i: skip captions longer than S tokens (official stages >= 1.2) instead of truncating
  # Batch composition: rows per step of each task over all hosts (official per-GPU sizes x data-parallel replicas).
  d.batch_size_t2i = 7
  d.batch_size_lm = 2
  d.batch_size_mmu = 6
  # Sources per task ("kind:argument", see mmada_jax/data/sources.py) and their mixture weights (stage 2.2 style, §4.6).
  d.t2i_sources = ("toyworld",)
  d.t2i_weights = (1.0,)
  d.lm_sources = ("toyworld",)
  d.lm_weights = (1.0,)
  d.mmu_sources = ("toyworld",)
  d.mmu_weights = (1.0,)
  d.shuffle = True  # global shuffle of every source each epoch (seeded from config.seed)
  d.strict = False  # raise on the first bad record (with its id) instead of skipping and counting it
  d.read_threads = 4  # grain threads that decode / lay out records
  d.prefetch_buffer = 64  # records decoded ahead per source
  d.tokenizer_dir = ""  # directory with tokenizer.json (official LLaDA/MMaDA files); "" = the ToyWorld tokenizer
  d.data_dir = ""  # where built data sets (ToyWorld ArrayRecord) live; "" = ~/.cache/mmada_jax
  d.image_tokenizer = ""  # MAGVIT-v2 parameter checkpoint that encodes images met in the data ("" = sources must
  #                         carry pre-computed image codes)
  # ToyWorld, the built-in data set (mmada_jax/data/toyworld.py).
  d.toyworld = ConfigDict()
  d.toyworld.image_size = 64  # pixels per side of the RGB images
  d.toyworld.grid = 3  # 3x3 (or 2x2) grid of object positions; image_size / grid must be >= 16 pixels
  d.toyworld.max_objects = 4  # at most this many shapes per image
  d.toyworld.num_train = 20000  # records per split (the test split is fixed by its own seed)
  d.toyworld.num_validation = 1000
  d.toyworld.num_test = 1000
  return d


def loss_section() -> ConfigDict:
  """The masked-denoising objective (mmada_jax/diffusion; specs/mmada-official.md §4.1-§4.5)."""
  lc = ConfigDict()
  lc.text_eps = 1e-3  # text masking probability p = (1 - eps) t + eps, t ~ U(0, 1) per row (LLaDA, §4.2)
  lc.lm_answer_only = True  # lm rows: never mask prompt_mask positions (chat/CoT prompts); plain text has none (§4.2)
  lc.image_schedule = "cosine"  # image mask ratio r(t): "cosine" cos(pi t/2) (official) or "linear" 1 - t (§4.1)
  lc.image_min_mask_rate = 0.0  # r = max(r, this) (official min_masking_rate); at least one image token is masked
  lc.coeff_t2i = 1.0  # stage loss weights (official stage 1.1: 1.0 / 0.1 / 1.0, other stages §4.6)
  lc.coeff_lm = 0.1
  lc.coeff_mmu = 1.0
  # lm normaliser: "tokens" = Σ CE/p ÷ (B·L) (pre-training stages 1.1/1.2), "answer" = Σ CE/p/answer_len ÷ B
  # (instruction and Mix-CoT stages; a plain-text row has answer_len = L). mmu always uses "answer" (§4.3).
  lc.lm_normalisation = "tokens"
  # Attention in the training pass (§4.5, §8.1): "float_bias" = the official additive 0/1 t2i pair bias (masks nothing,
  # reproduces the official losses), "key_mask" = hard key-padding mask from valid_mask, "pair_mask" = the samplers'
  # boolean pair mask, "none" = no mask (public code before commit 0ef94ba).
  lc.attention = "float_bias"
  # LM head at the loss positions only (never fp32 logits for the whole batch): "gather" (compact the loss positions
  # of each row group into a buffer; exact fallback to "chunked" when a group overflows), "chunked" (every position,
  # in chunks), "full" (whole [batch, length, vocab] logits; tests / tiny vocabularies only).
  lc.head = "gather"
  lc.head_chunk = 128  # positions per row evaluated at once: live logits ≈ rows x head_chunk x vocab fp32
  lc.head_capacity = 0.6  # "gather" buffer as a fraction of a group's positions (metric head_overflow counts fallbacks)
  lc.head_groups = 0  # "gather" row groups (compaction stays inside a group); 0 = the number of devices (one per shard)
  return lc


def optimizer_section() -> ConfigDict:
  """AdamW + warm-up/cosine schedule; official defaults (specs/mmada-official.md §4.4)."""
  o = ConfigDict()
  o.learning_rate = 1e-4  # peak
  o.schedule = "cosine"  # "cosine", "linear" or "constant" after the warm-up
  o.warmup_steps = 5000
  o.decay_steps = 500000  # step at which the decay reaches min_lr_scale (official max_train_steps)
  o.min_lr_scale = 0.0  # floor of the decay as a fraction of the peak (the official code ignores its 0.1)
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01  # applied to every parameter, as the official no-decay filter matches nothing
  o.grad_clip = 1.0  # global-norm clipping; 0 = off
  o.mu_dtype = "float32"  # dtype of Adam's first moment ("bfloat16" halves it)
  return o


def train_section() -> ConfigDict:
  """The training loop."""
  t = ConfigDict()
  t.steps = 1000  # total optimizer steps of the run
  t.micro_batches = 1  # gradient accumulation: the global batch is split into this many sequential micro-batches
  t.log_every = 10  # steps between metric lines (JSONL, TensorBoard, progress bar)
  t.eval_every = 0  # steps between held-out loss evaluations (0 = only at the end)
  t.eval_batches = 4  # held-out batches per evaluation
  t.sample_every = 0  # ToyWorld runs: steps between generation evals + sample grids in WORKDIR/samples (0 = off)
  t.sample_count = 32  # held-out records per task in those evals
  t.sample_tasks = ""  # comma-separated subset of text, mmu, t2i ("" = the tasks the run trains)
  t.init_from = ""  # parameter checkpoint (converted official weights or another run) to start from
  t.tensorboard = True  # write TensorBoard event files to WORKDIR/tensorboard (needs tensorboardX)
  t.peak_tflops = 0.0  # per-device peak for the MFU estimate; 0 = from the device kind's data sheet / a CPU measurement
  # Numerical faults (train/faults.py; also used by the UniGRPO loop): a step whose loss or gradient norm is not finite
  # is skipped (old parameters and optimiser state kept) and counted; this many consecutive ones stop the run
  # (0 = never).
  t.max_nonfinite_steps = 10
  t.loss_spike_factor = 3.0  # a loss above this x the running median of the last loss_spike_window steps is logged
  t.loss_spike_window = 100  # (0 factor = no spike detection)
  return t


def sampling_section() -> ConfigDict:
  """Sampler defaults (mmada_jax/diffusion/sampling_*.py; official demo values, specs/mmada-official.md §5)."""
  s = ConfigDict()
  s.text = ConfigDict()
  s.text.gen_length = 512  # official chat / MMU inference: G = 512, steps 256, block 128 (§5.1)
  s.text.block_length = 128
  s.text.steps = 256
  s.text.temperature = 0.0  # Gumbel temperature of the token proposal (0 = argmax)
  s.text.cfg_scale = 0.0  # classifier-free guidance s: un + (s + 1)(cond - un)
  s.text.remasking = "low_confidence"  # or "random"
  s.text.stop_at_eot = False  # stop after a block ending in vocab.eot_id in every row (official mmu_generate_fast)
  s.text.threshold = 0.0  # > 0: confidence-threshold parallel decoding (approximate; steps then ignored)
  s.text.dual_cache = False  # approximate key/value cache of the frozen prefix/suffix, refreshed per block
  s.eval_text = ConfigDict()  # the text-reasoning task of `mmada-jax eval` and of training's periodic evaluation:
  s.eval_text.gen_length = 0  # these replace sampling.text's (0 = keep it), e.g. a length near the training answers'
  s.eval_text.block_length = 0  # when the visual questions (same sampling.text otherwise) need longer answers
  s.eval_text.steps = 0
  s.image = ConfigDict()
  s.image.timesteps = 15  # official demos: 15 steps, guidance 3.5, T0 = 1, cosine (§5.2)
  s.image.guidance_scale = 3.5  # (1 + g) cond - g uncond
  s.image.temperature = 1.0
  s.image.noise_schedule = "cosine"  # or "linear"
  s.image.temperature_annealing = "cumulative"  # official (§8.6); "linear" = MaskGIT's T0 (1 - ratio)
  s.image.sample_temperature = 1.0  # token draw: 1 = official categorical, 0 = greedy, between = sharpened
  return s


def checkpoint_section() -> ConfigDict:
  """Orbax checkpoints of the train state, data iterator and config in WORKDIR/checkpoints."""
  c = ConfigDict()
  c.save_every_steps = 1000
  c.keep = 3  # most recent checkpoints kept
  c.keep_period = 0  # additionally keep every checkpoint whose step is a multiple of this (0 = none)
  c.async_save = True
  # Per committed step a manifest of its files, verified at restore (a corrupt step falls back to the previous one):
  # "sha256" (sizes and content hashes; reads each checkpoint back once), "size" (sizes only, catches truncation) or
  # "none".
  c.manifest = "sha256"
  return c


def rl_section() -> ConfigDict:
  """UniGRPO reinforcement learning (mmada_jax/rl; specs/unigrpo.md). Defaults follow the spec's recommendations
  (§2.7, §5 "recommended starting point"); every choice the paper leaves open is a key here."""
  r = ConfigDict()
  r.task = "text"  # rollouts: "text" (reasoning answers from the semi-autoregressive sampler) or "t2i" (images from the
  #                 MaskGIT sampler with the sampling.image settings, decoded by data.image_tokenizer; rl/t2i.py)
  r.prompt_source = "toyworld"  # "toyworld": ToyWorld arithmetic word problems in the CoT chat format
  r.steps = 100  # RL steps (rollout batches); each takes inner_steps optimiser updates
  r.seed = 0  # RL randomness (prompt order, rollouts, schedules, masks); vary this, not `seed`, across RL seeds: `seed`
  #            also fixes the ToyWorld data and hence its trained tokenizer, which must match the starting checkpoint
  r.prompts_per_step = 4  # Q prompts per rollout batch; rows B = Q * group_size (a multiple of the batch shards)
  r.group_size = 8  # G responses per prompt
  r.inner_steps = 4  # μ gradient steps per rollout batch, one mask-ratio iteration each (Algorithm 1)
  r.masks_per_step = 1  # K masks per gradient step (1 = the paper; > 1 averages K masks, variance reduced)
  r.estimator = "unigrpo"  # or "d1": every response token masked + prompt masking (diffu-GRPO baseline)
  r.d1_prompt_mask_prob = 0.15  # d1: prompt tokens masked with this probability
  r.schedule = "algorithm1"  # "algorithm1", "stratified_wrap", "iid", "range" (rl/schedule.py); d1 forces p = 1
  r.schedule_T = 1000  # timesteps quantising the ratio (paper §5.2)
  r.schedule_shared = False  # one ratio draw for the whole batch instead of one per response
  r.ratio_range = (0.1, 0.9)  # "range" schedule bounds (dLLM-RL)
  r.p_min = 0.0  # lower clamp of every mask ratio
  r.mask_law = "exact"  # "exact" count (>= 1 token) or "bernoulli"
  r.mask_tail = True  # positions after the first EOS may be masked in the input (the SFT convention)
  r.loss_tail = "first_eos"  # loss positions: "first_eos" (up to and including the first EOS) or "all"
  r.clip_low = 0.2  # ε_low: ratio clipped below at 1 - clip_low
  r.clip_high = 0.2  # ε_high: ratio clipped above at 1 + clip_high
  r.kl_beta = 0.04  # β of the k3 KL to the frozen reference (0 = no reference pass)
  r.normalisation = "sample"  # "sample" (paper App. A.2) or "token" (d1 / IGPO)
  r.seq_normaliser = "masked"  # sample-level divisor: |masked loss tokens| or "response" (|o_i|, literal Eq. 5)
  r.adv_std = True  # divide by the group's population std (Eq. 15); False = mean-only (d1 / IGPO)
  r.adv_eps = 1e-6  # std below this: advantage 0, group counted as zero-std
  r.filter_zero_std = False  # give rows of zero-std groups weight 0
  r.oversample = 1  # F > 1: roll out F * prompts_per_step prompts and train on the prompts_per_step groups whose
  #                  rewards differ (dynamic sampling, as DAPO; zero-std groups only fill what is left). 1 = the paper
  r.oversample_by = "total"  # what must differ within a kept group: "total" reward, "accuracy" (DAPO's filter: the
  #                           correctness / checker component) or one reward component named in rl.rewards
  r.logratio_clamp = 0.0  # > 0: log-ratio clipped to [-c, c] before exp
  r.logp_mode = "fold"  # how several masks are evaluated: "fold" (one pass), "vmap" or "map" (rl/objective.py)
  r.micro_batches = 1  # gradient accumulation over row slices inside the policy step
  r.prompt_len = 256  # prompts are left-padded to this static length (longer ones are an error)
  r.gen_length = 256  # rollout sampler: response length C (text), block length, model calls, Gumbel temperature
  r.block_length = 32
  r.rollout_steps = 128
  r.temperature = 1.0
  r.remasking = "low_confidence"
  r.rewards = ("correctness", "format")  # reward components (rl/rewards.py REWARDS)
  r.reward_weights = (2.0, 0.5)  # one weight per component (paper: correctness 2.0, format 0.5)
  r.format_strict = False  # "format": soft <think>...</think> search, or the strict layout check
  r.clip_model_dir = ""  # local weights of the CLIP-score reward (required by the "clip" component)
  r.image_reward_dir = ""  # local weights of the ImageReward reward (required by the "image_reward" component)
  r.eval_prompts = 0  # held-out (test split) prompts scored greedily at the start, every eval_every steps, the end
  r.eval_every = 0  # RL steps between held-out evaluations (0 = start and end only)
  r.eval_at_start = True  # evaluate the starting policy too (False: runs that share an already evaluated start model)
  r.eval_samples = 0  # also score this many more answers per held-out prompt, other fixed keys, as eval_sampled_*:
  #                   text sampled like the rollouts (rl.temperature), t2i more images (0 = greedy text / one image)
  r.log_every = 1  # RL steps between metric lines
  r.dump_every = 10  # RL steps between sample dumps (WORKDIR/samples.jsonl); 0 = never
  r.dump_count = 4  # responses written per dump
  return r


def get_base_config() -> ConfigDict:
  """The full default config (official 8B shape); experiments override values."""
  config = ConfigDict()
  config.name = "base"
  config.seed = 0
  config.model = model_section()
  config.vocab = vocab_section()
  config.sharding = sharding_section()
  config.magvit = magvit_section()
  config.data = data_section()
  config.loss = loss_section()
  config.optimizer = optimizer_section()
  config.train = train_section()
  config.checkpoint = checkpoint_section()
  config.sampling = sampling_section()
  config.rl = rl_section()
  return config


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def _require(cond: bool, key: str, msg: str, errors: list[str]) -> None:
  if not cond:
    errors.append(f"{key}: {msg}")


def row_lengths(config: ConfigDict) -> dict[str, int]:
  """`{task: length of its training rows}`: L = S + N + 3 (`Prompter.seq_len`) for t2i and mmu, `data.lm_seq_len`
  (0 = L) for lm."""
  from mmada_jax.tokens import prompting

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
           f"'cudnn' needs model.dtype bfloat16 or float16 (the fused kernel has no fp32 mode), got {m.dtype!r}", errors)


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
           f"image ids end at vocab.image_offset + vocab.codebook_size = {v.image_offset + v.codebook_size}, beyond the "
           f"model.vocab_size={rows} rows of the embedding", errors)
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
    _require(isinstance(t[key], int) and t[key] > 0, f"magvit.train.{key}", f"must be a positive integer, got {t[key]!r}",
             errors)
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
  from mmada_jax.parallel import rules  # local import: parallel depends on config, not the reverse

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
  from mmada_jax.parallel import rules  # local import: parallel depends on config, not the reverse

  errors.extend(rules.validate_sharding_config(config.sharding))
  _validate_preset(config.sharding, errors)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return config


# ----------------------------------------------------------------------------------------------------------------------
# Loading experiment files


def load_module(path: str):
  """Imports an experiment file as a module."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_mmada_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  return module


def load_config_file(path: str, arg: str | None = None) -> ConfigDict:
  """Imports an experiment file and calls its `get_config(arg)`; `path` may end in `:arg`."""
  if arg is None and ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  module = load_module(path)
  try:
    return module.get_config(arg) if arg is not None else module.get_config()
  except ValueError as e:  # e.g. an unknown variant
    raise ConfigError(f"{path}: {e}") from None


def parse_override_value(text: str, current: Any) -> Any:
  """Parses `text` into the type of the existing value `current`."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected a boolean, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    items = [t.strip() for t in text.strip("()[]").split(",") if t.strip()]
    elem = current[0] if current else ""
    return type(current)(parse_override_value(t, elem) for t in items)
  return text


def apply_overrides(config: ConfigDict, overrides: dict[str, str]) -> ConfigDict:
  """Applies `{"model.num_layers": "4", ...}` (values as strings, typed like the existing value)."""
  for dotted, text in overrides.items():
    parent, _, leaf = dotted.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
      if part not in node:
        raise ConfigError(f"--config.{dotted}: no such key '{part}' (known: {sorted(node.keys())})")
      node = node[part]
    if leaf not in node:
      if isinstance(node, ConfigDict) and dotted.startswith("sharding.rule_overrides."):
        with node.unlocked():
          node[leaf] = text
        continue
      raise ConfigError(f"--config.{dotted}: no such key '{leaf}' (known: {sorted(node.keys())})")
    try:
      node[leaf] = parse_override_value(text, node[leaf])
    except (ValueError, ConfigError) as e:
      raise ConfigError(f"--config.{dotted}={text}: {e}") from None
  return config


def split_config_args(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
  """Separates `--config PATH` / `--config=PATH` and `--config.a.b=V` / `--config.a.b V` from other arguments."""
  path, overrides, rest = None, {}, []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" or a.startswith("--config="):
      if a == "--config":
        if i + 1 >= len(argv):
          raise ConfigError("--config needs a file path")
        path, i = argv[i + 1], i + 2
      else:
        path, i = a.split("=", 1)[1], i + 1
      continue
    if a.startswith("--config."):
      key = a[len("--config."):]
      if "=" in key:
        key, value = key.split("=", 1)
        i += 1
      else:
        if i + 1 >= len(argv):
          raise ConfigError(f"{a} needs a value")
        value, i = argv[i + 1], i + 2
      overrides[key] = value
      continue
    rest.append(a)
    i += 1
  return path, overrides, rest


def load_config(path: str, overrides: dict[str, str] | None = None) -> ConfigDict:
  """Loads an experiment file, applies command-line overrides, validates, and locks the result."""
  config = load_config_file(path)
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  apply_overrides(config, overrides or {})
  validate(config)
  config.lock()
  return config
