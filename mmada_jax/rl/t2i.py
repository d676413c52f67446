"""UniGRPO for text-to-image (`rl.task = "t2i"`): MaskGIT rollouts of drawing prompts, image rewards.

A t2i rollout row is the sampler's own layout `[iPAD]* <|t2i|> BOS text EOS <|soi|> img_1..img_N <|eoi|>`, split
into the prompt (everything up to and including `<|soi|>`, P = L − N − 1 positions, its padding mask the sampler's)
and the response (the N drawn image tokens and `<|eoi|>`, C = N + 1). Only the N image positions are maskable and
enter the loss; `<|eoi|>` stays visible, as in training and sampling. The policy's log-probabilities of a masked image
token are normalised over the image codebook only (`StepSettings` `vocab_slice`, spec §6.4, as MaskGRPO), which is
the distribution the sampler draws from.

Rollouts use the t2i sampler with the config's `sampling.image` settings (steps, schedule, annealing, token
temperature) and classifier-free guidance `sampling.image.guidance_scale`; the log-probabilities are those of the
conditional model. With guidance > 0 the rollouts are therefore drawn from a sharper distribution than the one the
ratio is taken of (MMaDA's paper does not say how its t2i rollouts were drawn);
`--config.sampling.image.guidance_scale=0` makes them exactly on-policy. Rewards read the decoded images
(`rl.rewards`: `t2i_checker`, `t2i_attributes`, `clip`, `image_reward`); the held-out evaluation draws the test
split's prompts with a fixed key and scores them the same way. The drawing prompts themselves come from
`rl/prompts.py` (`draw_record`).
"""

from __future__ import annotations

import jax
import numpy as np

from mmada_jax.config import ConfigError
from mmada_jax.diffusion import sampling_image as si
from mmada_jax.inference.image_tokenizer import ImageTokenizer, load_image_tokenizer
from mmada_jax.parallel import partitioning
from mmada_jax.tokens import prompting

IMAGE_REWARDS = ("t2i_checker", "t2i_attributes", "clip", "image_reward")


def dims(config) -> tuple[int, int]:
  """(P, C): prompt and response positions of a t2i RL row."""
  prompter = prompting.Prompter.from_config(config)
  n = int(config.vocab.num_image_tokens)
  return prompter.seq_len - n - 1, n + 1


def vocab_slice(config) -> tuple[int, int]:
  """Token ids [a, b) of the image codebook: the support of the t2i policy."""
  a = int(config.vocab.image_offset)
  return a, a + int(config.vocab.codebook_size)


def settings(config) -> si.ImageSampling:
  return si.ImageSampling.from_config(config.sampling.image)


def rollout(run, records: list[dict], key: jax.Array, images: ImageTokenizer) -> dict:
  """One image per record → prompt ids/mask [B, P], responses [B, C] (numpy) and samples with decoded images.
  `run` is the `setup.RLRun` (its config, mesh, rules, model, policy state and vocabulary)."""
  prompter = prompting.Prompter.from_config(run.config)
  layouts = prompting.stack([prompter.t2i_gen(r["prompt_ids"]) for r in records])
  ids, valid = layouts["input_ids"], layouts["valid_mask"]
  s = settings(run.config)
  un_ids, un_mask = si.null_prompt(prompter, len(records)) if s.guidance_scale > 0 else (None, None)
  with partitioning.axis_rules(run.mesh, run.rules):
    out = si.t2i_generate(run.model, run.state.params, ids, valid, un_ids, un_mask,
                          **si.image_vocab_args(run.vocab), settings=s, rng=key)
  codes = np.clip(np.asarray(jax.device_get(out["codes"])), 0, run.vocab.codebook_size - 1)
  p, c = dims(run.config)
  response = np.concatenate([codes + run.vocab.image_offset, ids[:, -1:]], axis=1).astype(np.int32)
  decoded = images.decode(codes)
  samples = [{"image": decoded[i], "record": r["record"], "prompt": r["prompt"], "id": r["id"], "truncated": False,
              "length": c - 1} for i, r in enumerate(records)]
  return {"ids": ids[:, :p], "mask": valid[:, :p], "response": response, "samples": samples}


def positions(response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(maskable, eligible) [B, C]: the image tokens, not `<|eoi|>`."""
  out = np.ones(response.shape, bool)
  out[:, -1] = False
  return out, out


def check(config) -> None:
  """Refuses t2i RL settings that cannot work, naming the key."""
  r = config.rl
  if not config.data.image_tokenizer:
    raise ConfigError("rl.task='t2i' decodes its rollouts for the image rewards: set data.image_tokenizer to the "
                      "MAGVIT checkpoint the backbone was trained with")
  wrong = [n for n in r.rewards if n not in IMAGE_REWARDS]
  if wrong:
    raise ConfigError(f"rl.task='t2i': rl.rewards {list(wrong)} are text rewards; use image ones {IMAGE_REWARDS}")


def image_tokenizer(config, log) -> ImageTokenizer:
  return load_image_tokenizer(config, config.data.image_tokenizer, log)
