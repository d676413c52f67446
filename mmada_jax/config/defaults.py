"""The base configuration: every key that code reads lives here, with its default.

Experiment files in `experiments/` start from `get_base_config()` and change values; they never add keys (the config is
locked).

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

import ml_collections

ConfigDict = ml_collections.ConfigDict

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_proj", "save_out_proj")
MATMUL_PRECISIONS = ("default", "high", "highest")


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
  # LFQ training losses (official LFQuantizer defaults, docs/parity.md §9).
  g.beta = 0.25
  g.commit_multiplier = 0.1
  g.entropy_multiplier = 0.1
  # Training from scratch (mmada_jax/train/magvit.py, `mmada-jax magvit`).
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
  #                   rows (chat / CoT text) skip the EOS padding up to L; the loss then runs one forward pass per
  #                   length
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
