"""UniGRPO on ToyWorld arithmetic (text reasoning) — the stage after Mix-CoT in the ToyWorld demo.

Variants (`experiments/toyworld_rl.py:<variant>`):
  text     UniGRPO as the paper specifies it: Algorithm-1 mask-ratio schedule per response, exact-count masks,
           sample-level normalisation, mean/std advantages, k3 KL to the frozen reference, correctness 2.0 + format 0.5.
  text_d1  the d1 / diffu-GRPO baseline estimator under the same budget: every response token masked, prompt tokens
           masked with probability 0.15, token-level normalisation, mean-only advantages.
  t2i      UniGRPO on the drawing prompts (`rl/t2i.py`): MaskGIT rollouts with the `sampling.image` settings, rewards
           ToyWorld image checker 2.0 + per-attribute agreement 0.5 on the decoded images, log-probabilities over the
           image codebook. Needs `--config.data.image_tokenizer=CKPT` (the MAGVIT the backbone was trained with).
  t2i_d1   the d1 baseline estimator on the same drawing task and budget.

Everything but the `rl` and optimiser sections comes from `experiments/toyworld.py:cot` (model shape, vocabulary, image
tokenizer section), so the Mix-CoT run of `mmada-jax demo` (DIR/cot) is a valid start:
`mmada-jax rl --config experiments/toyworld_rl.py:text --workdir DIR --init_from DEMO_DIR/cot` (a run workdir or a
parameter checkpoint; `--config.train.init_from=...` is the same). Responses `<think>a+b=c</think>c<|eot_id|>` take at
most 13 ToyWorld tokens; rollouts generate 16 in two blocks of 8, one token per model call, at temperature 1.
A start model that already answers most problems leaves most groups without reward variance; `--config.rl.oversample=3`
rolls out three times the prompts and trains on the groups that differ (docs/unigrpo.md).
"""

import os

from mmada_jax.config import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("text", "text_d1", "t2i", "t2i_d1")


def get_config(arg: str | None = None):
  variant = arg or "text"
  if variant not in VARIANTS:
    raise ValueError(f"toyworld_rl: unknown variant {variant!r} ({', '.join(VARIANTS)})")
  config = load_module(os.path.join(HERE, "toyworld.py")).get_config("cot")
  config.name = f"toyworld_rl_{variant}"
  o = config.optimizer  # spec §5: a small constant learning rate after a short warm-up; AdamW β2 0.99, no decay
  # 3e-5: at 1e-4 the KL to the reference passed 0.2 (drawing) and 0.5 (text) within 50 steps and held-out scores fell
  o.learning_rate, o.schedule, o.warmup_steps, o.decay_steps = 3e-5, "constant", 5, 5
  o.b2, o.weight_decay, o.grad_clip = 0.99, 0.0, 1.0
  config.train.tensorboard = False
  config.checkpoint.save_every_steps = 20
  r = config.rl
  r.steps, r.prompts_per_step, r.group_size, r.inner_steps = 100, 8, 8, 4
  r.prompt_len, r.gen_length, r.block_length, r.rollout_steps, r.temperature = 96, 16, 8, 16, 1.0
  r.kl_beta, r.clip_low, r.clip_high = 0.04, 0.2, 0.2
  r.eval_prompts, r.eval_every, r.dump_every = 128, 25, 10
  if variant.startswith("t2i"):
    r.task, r.rewards, r.reward_weights = "t2i", ("t2i_checker", "t2i_attributes"), (2.0, 0.5)
    r.prompts_per_step, r.group_size, r.eval_prompts = 4, 8, 64  # a rollout draws 256 image tokens in 12 model calls
  if variant.endswith("_d1"):
    r.estimator, r.normalisation, r.adv_std = "d1", "token", False
  return config
