"""MMaDA-8B training stages as configs (specs/mmada-official.md §4.6), one loop for all of them.

  mmada-jax train --config experiments/mmada_8b_stages.py:1.1 --workdir gs://BUCKET/mmada/stage1_1 \\
      --init_from ckpt/llada_8b_resized --config.data.lm_sources=parquet:/data/refinedweb/*.parquet ...

| stage | what | init | res / N / S / L | global rows t2i/lm/mmu (micro-batches) | lr | coeffs t2i/lm/mmu |
| 1.1 | ImageNet pre-training | LLaDA-8B-Instruct, vocabulary grown to 134,656 rows | 256/256/128/387 | 896/256/768 (2) | 1e-4 | 1.0/0.1/1.0 |
| 1.2 | image-text pre-training | 1.1 | 256/256/256/515 | 896/256/384 (2) | 5e-5 | 1.0/0.1/0.5 |
| 1.3 | text instruction | 1.2 | 512/1024/512/1539 | 1024/256/256 (4) | 5e-5 | 1.0/0.4/0.5 |
| 2.1 | Mix-CoT (text) | 1.3 | 512/1024/512/1539 | 256/512/256 (4) | 5e-5 | 1.0/0.5/0.5 |
| 2.2 | Mix-CoT (multimodal) | 2.1 | 512/1024/512/1539 | 256/512/256 (4) | 5e-5 | 0.05/0.6/0.4 |

Global rows are the official per-GPU batch × 64 GPUs × gradient accumulation. Warm-up 5,000 steps; cosine decay over
the official `max_train_steps` (5e5 for 1.1, 1e6 after); `min_lr_scale` 0.1 where the official yaml asks for it
(the official scheduler ignores it; set 0 to reproduce that). Data sources name the official data sets in their
expected prepared form (ArrayRecord from `mmada-jax prepare`, Parquet, tfds); point them at your copies with
`--config.data.<task>_sources=...`. bf16 compute with fp32 master weights, layers scanned and fully rematerialised.
"""

from mmada_jax.config import get_base_config

STAGES = {
    # stage: (S, N, resolution, rows t2i/lm/mmu, micro, lr, decay, min_lr_scale, coeffs, lm normalisation)
    "1.1": (128, 256, 256, (896, 256, 768), 2, 1e-4, 500000, 0.0, (1.0, 0.1, 1.0), "tokens"),
    "1.2": (256, 256, 256, (896, 256, 384), 2, 5e-5, 1000000, 0.1, (1.0, 0.1, 0.5), "tokens"),
    "1.3": (512, 1024, 512, (1024, 256, 256), 4, 5e-5, 1000000, 0.1, (1.0, 0.4, 0.5), "answer"),
    "2.1": (512, 1024, 512, (256, 512, 256), 4, 5e-5, 1000000, 0.1, (1.0, 0.5, 0.5), "answer"),
    "2.2": (512, 1024, 512, (256, 512, 256), 4, 5e-5, 1000000, 0.1, (0.05, 0.6, 0.4), "answer"),
}

SOURCES = {
    "1.1": {"t2i": (("tfds:imagenet2012:train:imagenet_labels.txt",), (1.0,)),
            "lm": (("parquet:refinedweb/*.parquet",), (1.0,)),
            "mmu": (("wds:captions/sa1b-cc12m-laion/*.tar",), (1.0,))},
    "1.2": {"t2i": (("wds:captions/sa1b-cc12m-laion/*.tar",), (1.0,)),
            "lm": (("parquet:refinedweb/*.parquet",), (1.0,)),
            "mmu": (("wds:captions/sa1b-cc12m-laion/*.tar",), (1.0,))},
    "1.3": {"t2i": (("wds:t2i/journeydb-laion-t2i2m/*.tar",), (1.0,)),
            "lm": (("parquet:instruct/*.parquet",), (1.0,)),
            "mmu": (("wds:captions/sa1b-cc12m-laion/*.tar",), (1.0,))},
    "2.1": {"t2i": (("wds:t2i/journeydb-laion-filtered/*.tar",), (1.0,)),
            "lm": (("parquet:cot_sft/*.parquet",), (1.0,)),
            "mmu": (("jsonl:mmu_cot/*.jsonl", "wds:captions/laion/*.tar"), (1.0, 1.0))},
    # 2.2: per step one mmu source with probability proportional to 3.5 / 5.5 / 0.5 / 0.5, and lm = RefinedWeb with
    # probability 0.02 or the stage-4 instruction data with 0.98 (§4.6).
    "2.2": {"t2i": (("wds:t2i/journeydb-laion-filtered/*.tar",), (1.0,)),
            "lm": (("parquet:refinedweb/*.parquet", "parquet:stage4_instruct/*.parquet"), (0.02, 0.98)),
            "mmu": (("jsonl:mmu_cot/*.jsonl", "llava:llava_v1_5_mix665k.json:llava_images",
                     "llava:clevr_cogent_70k.json:clevr_images", "llava:geo170k.json:geo_images"),
                    (3.5, 5.5, 0.5, 0.5))},
}


VARIANTS = tuple(STAGES)


def get_config(arg: str | None = None):
  stage = arg or "1.1"
  if stage not in STAGES:
    raise ValueError(f"mmada_8b_stages: unknown stage {stage!r} (one of {sorted(STAGES)})")
  s, n, res, rows, micro, lr, decay, floor, coeffs, lm_norm = STAGES[stage]
  config = get_base_config()
  config.name = f"mmada_8b_stage{stage}"
  config.seed = 10086  # the official yaml seed
  m = config.model
  m.param_dtype, m.dtype, m.scan_layers, m.remat_policy = "float32", "bfloat16", True, "full"
  config.vocab.num_image_tokens = n
  config.magvit.resolution = res
  d = config.data
  d.max_text_len = s
  d.batch_size_t2i, d.batch_size_lm, d.batch_size_mmu = rows
  d.drop_long_captions = stage != "1.1"  # captions longer than S tokens are dropped in stages >= 1.2 (§4.6)
  for task, (specs, weights) in SOURCES[stage].items():
    d[f"{task}_sources"], d[f"{task}_weights"] = specs, weights
  if stage in ("2.1", "2.2"):
    config.magvit.resize_mode = "squash"  # CoT image data use the squash transform (§2.6)
  o = config.optimizer
  o.learning_rate, o.warmup_steps, o.decay_steps, o.min_lr_scale = lr, 5000, decay, floor
  config.train.micro_batches = micro
  config.train.steps = decay
  config.train.log_every = 10
  config.train.eval_every = 5000
  config.checkpoint.save_every_steps = 2000
  config.checkpoint.keep_period = 10000
  lc = config.loss
  lc.coeff_t2i, lc.coeff_lm, lc.coeff_mmu = coeffs
  lc.lm_normalisation = lm_norm
  return config
