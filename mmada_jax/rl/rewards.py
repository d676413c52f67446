"""Pluggable rewards of UniGRPO (specs/unigrpo.md §4; paper §2.3.2).

A reward component is a function `samples -> [n] float` with values in [0, 1] (weights are applied by `RewardModel`).
A sample is a dict; which keys a component reads:
  response   str, the decoded response cut at its first terminator (text / multimodal reasoning)
  answer     str, the reference answer
  truncated  bool, no terminator within the generation length (such responses score 0 correctness, spec §4.1, §7.10)
  image      [H, W, 3] uint8 decoded image (text-to-image) and `record`, the ToyWorld record it was drawn for

Components (`REWARDS`; `rl.rewards` / `rl.reward_weights` pick them, paper weights 2.0 and 0.5):
  correctness              the answer after the last `</think>` (its last `\\boxed{}` when there is one) matches the
                           reference under ToyWorld's `check_answer` (normalised text, first integer for numbers), as
                           the held-out ToyWorld evaluation scores it (`eval/toyworld_eval.py`)
  correctness_math         GSM8K / MATH style, the evaluation's `eval.answers.is_correct` (boxed, ####, last number)
  format                   `<think>...</think>` present (soft, DOTALL search, as MaskGRPO) or, with
                           `rl.format_strict`, the response starts with `<think>`, has exactly one non-empty think block
                           and a non-empty answer after it (spec §4.1; the soft check is trivially satisfiable, §7.9)
  t2i_checker              ToyWorld `check_draw` on the decoded image: the programmatic image checker (1 or 0)
  t2i_attributes           mean per-attribute agreement of the decoded image with its prompt (count, position, colour,
                           shape of a described scene; count, colour, shape for "count" / "reason" prompts, whose
                           positions are free): partial credit, 1 exactly when the checker passes; objects beyond
                           those asked lower it (without that, UniGRPO learnt to overdraw)
  clip / image_reward      hooks for CLIP score / ImageReward with local weights (`rl.clip_model_dir`,
                           `rl.image_reward_dir`); a clear `RewardError` when the weights or the packages are absent

`register_reward(name, fn)` adds a component (e.g. a user's own scorer) under a new name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from mmada_jax.data import toyworld_checkers as checkers
from mmada_jax.eval import answers

Sample = dict[str, Any]
RewardFn = Callable[[Sequence[Sample]], np.ndarray]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RewardError(ValueError):
  """A reward component cannot be built (unknown name, missing weights or packages) or misses sample fields."""


# ----------------------------------------------------------------------------------------------------------------------
# Answer extraction


def extract_answer(response: str, think_close: str = THINK_CLOSE) -> str:
  """The final answer: the text after the last `</think>` (whole response without one), its last `\\boxed{}` if any."""
  tail = checkers.final_answer(response, think_close)
  boxed = answers.last_boxed(tail)
  return (boxed if boxed is not None else tail).strip()


def _field(sample: Sample, key: str, component: str):
  if key not in sample:
    raise RewardError(f"reward {component!r} needs sample[{key!r}] (sample has {sorted(sample)})")
  return sample[key]


# ----------------------------------------------------------------------------------------------------------------------
# Text components


def correctness(samples: Sequence[Sample]) -> np.ndarray:
  """1 where the extracted answer matches the reference (ToyWorld `check_answer`), 0 otherwise or when truncated."""
  out = np.zeros(len(samples), np.float32)
  for i, s in enumerate(samples):
    if s.get("truncated", False):
      continue
    out[i] = checkers.check_answer(extract_answer(_field(s, "response", "correctness")),
                                   str(_field(s, "answer", "correctness")))
  return out


def correctness_math(samples: Sequence[Sample]) -> np.ndarray:
  """1 where `eval.answers.is_correct` accepts the response (GSM8K / MATH style: the last `\\boxed{}`, `####` answer
  or last number after `</think>`, canonical numbers), 0 otherwise or when truncated."""
  out = np.zeros(len(samples), np.float32)
  for i, s in enumerate(samples):
    if not s.get("truncated", False):
      out[i] = answers.is_correct(_field(s, "response", "correctness_math"),
                                  str(_field(s, "answer", "correctness_math")))
  return out


_SOFT_THINK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), re.DOTALL)


def has_think_format(response: str, strict: bool = False) -> bool:
  """Soft: a `<think>...</think>` pair anywhere. Strict: starts with `<think>`, exactly one pair, non-empty reasoning
  and non-empty text after `</think>`."""
  if not strict:
    return _SOFT_THINK.search(response) is not None
  text = response.strip()
  if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
    return False
  reasoning, _, answer = text[len(THINK_OPEN):].partition(THINK_CLOSE)
  return bool(reasoning.strip()) and bool(answer.strip())


def format_reward(strict: bool = False) -> RewardFn:
  def fmt(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([has_think_format(_field(s, "response", "format"), strict) for s in samples], np.float32)

  return fmt


# ----------------------------------------------------------------------------------------------------------------------
# Text-to-image components


def t2i_checker(samples: Sequence[Sample]) -> np.ndarray:
  """1 where ToyWorld's image checker accepts the decoded image for its record's prompt (`check_draw`)."""
  return np.array([checkers.check_draw(_field(s, "image", "t2i_checker"), _field(s, "record", "t2i_checker"))
                   for s in samples], np.float32)


def t2i_attributes(samples: Sequence[Sample]) -> np.ndarray:
  """Mean of the per-attribute scores of the decoded image against its prompt (`draw_attribute_scores`: count,
  position, colour, shape of a described scene; count, colour, shape of a "count" / "reason" prompt)."""
  out = []
  for s in samples:
    scores = checkers.draw_attribute_scores(_field(s, "image", "t2i_attributes"), _field(s, "record", "t2i_attributes"))
    out.append(np.mean(list(scores.values())))
  return np.asarray(out, np.float32)


@dataclasses.dataclass
class ClipScore:
  """max(cos(image embedding, text embedding), 0) in [0, 1] per sample; the usual CLIP score is 100 times this, so the
  paper's weight 0.1 on the CLIP score is weight 10 here. The embedders are injected: `image_embed([n, H, W, 3]) ->
  [n, d]`, `text_embed(list[str]) -> [n, d]`; `text_key` names the sample field compared with the image ("prompt")."""
  image_embed: Callable[[np.ndarray], np.ndarray]
  text_embed: Callable[[list[str]], np.ndarray]
  text_key: str = "prompt"

  def __call__(self, samples: Sequence[Sample]) -> np.ndarray:
    images = np.stack([_field(s, "image", "clip") for s in samples])
    a = np.asarray(self.image_embed(images), np.float64)
    b = np.asarray(self.text_embed([str(_field(s, self.text_key, "clip")) for s in samples]), np.float64)
    cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return np.maximum(cos, 0.0).astype(np.float32)


def _weights_dir(path: str, key: str, what: str) -> str:
  if not path:
    raise RewardError(f"the {what} reward needs local weights: set {key} to a directory holding them (nothing is "
                      f"downloaded)")
  if not os.path.isdir(path):
    raise RewardError(f"{key}={path!r}: no such directory (the {what} reward needs its weights there)")
  return path


def load_clip(model_dir: str) -> ClipScore:
  """A `ClipScore` from a local Hugging Face CLIP directory (Flax weights via `transformers`)."""
  path = _weights_dir(model_dir, "rl.clip_model_dir", "CLIP-score")
  try:
    import transformers
  except ImportError:
    raise RewardError("the CLIP-score reward needs the `transformers` package (pip install transformers) to read "
                      f"{path}") from None
  model = transformers.FlaxCLIPModel.from_pretrained(path, local_files_only=True)
  processor = transformers.CLIPProcessor.from_pretrained(path, local_files_only=True)
  image_embed = lambda x: np.asarray(model.get_image_features(**processor(images=list(x), return_tensors="np")))
  text_embed = lambda t: np.asarray(model.get_text_features(**processor(text=t, return_tensors="np", padding=True,
                                                                          truncation=True)))
  return ClipScore(image_embed, text_embed)


def load_image_reward(model_dir: str) -> RewardFn:
  """ImageReward v1.0 scores from local weights (`ImageReward-v1.0.pt` + `med_config.json` in `model_dir`), via the
  `image-reward` package; the raw score (a z-scored preference, ~[-2, 2]) is returned unscaled."""
  path = _weights_dir(model_dir, "rl.image_reward_dir", "ImageReward")
  try:
    import ImageReward as image_reward
  except ImportError:
    raise RewardError("the ImageReward reward needs the `image-reward` package (and PyTorch) to read "
                      f"{path}") from None
  model = image_reward.load(os.path.join(path, "ImageReward-v1.0.pt"), med_config=os.path.join(path, "med_config.json"),
                            download_root=path)

  def score(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([model.score(str(_field(s, "prompt", "image_reward")),
                                 Image.fromarray(_field(s, "image", "image_reward"))) for s in samples], np.float32)

  return score


# ----------------------------------------------------------------------------------------------------------------------
# Registry and the weighted sum

_FACTORIES: dict[str, Callable[[Any], RewardFn]] = {
    "correctness": lambda rl: correctness,
    "correctness_math": lambda rl: correctness_math,
    "format": lambda rl: format_reward(bool(rl.get("format_strict", False))),
    "t2i_checker": lambda rl: t2i_checker,
    "t2i_attributes": lambda rl: t2i_attributes,
    "clip": lambda rl: load_clip(str(rl.get("clip_model_dir", ""))),
    "image_reward": lambda rl: load_image_reward(str(rl.get("image_reward_dir", ""))),
}
REWARDS = tuple(_FACTORIES)


def register_reward(name: str, fn: RewardFn) -> None:
  """Adds a component under `name` (usable in `rl.rewards`)."""
  if name in _FACTORIES:
    raise RewardError(f"reward {name!r} already exists")
  _FACTORIES[name] = lambda rl: fn


@dataclasses.dataclass
class RewardModel:
  """Weighted sum of components. `__call__(samples)` → `{component: [n], "total": [n], "accuracy": [n]}` where
  accuracy is the first correctness-type component (or zeros)."""
  names: tuple[str, ...]
  weights: tuple[float, ...]
  fns: tuple[RewardFn, ...]

  @classmethod
  def from_config(cls, rl_config) -> "RewardModel":
    names, weights = tuple(rl_config.rewards), tuple(float(w) for w in rl_config.reward_weights)
    if len(names) != len(weights):
      raise RewardError(f"rl.reward_weights {weights} needs one weight per component of rl.rewards {names}")
    unknown = [n for n in names if n not in _FACTORIES]
    if unknown:
      raise RewardError(f"rl.rewards: unknown components {unknown} (known: {sorted(_FACTORIES)})")
    return cls(names, weights, tuple(_FACTORIES[n](rl_config) for n in names))

  def __call__(self, samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    out = {n: np.asarray(fn(samples), np.float32) for n, fn in zip(self.names, self.fns)}
    out["total"] = sum((w * out[n] for n, w in zip(self.names, self.weights)), np.zeros(len(samples), np.float32))
    acc = [n for n in self.names if n.startswith("correctness") or n == "t2i_checker"]
    out["accuracy"] = out[acc[0]] if acc else np.zeros(len(samples), np.float32)
    return out
