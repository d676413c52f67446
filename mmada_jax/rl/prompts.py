"""RL prompt sources: deterministic, checkpointable streams of prompt records (step 1 of specs/unigrpo.md §6.1).

A prompt record (`PromptRecord`) is a dict:
  id          str        stable id of the prompt (ToyWorld: `toyworld/<split>/<index>`)
  prompt_ids  list[int]  the ids the sampler continues (text: BOS + the chat-formatted CoT prompt; t2i: the caption,
                         laid out by `rl/t2i.py`)
  prompt      str        the prompt text (sample dumps)
  answer      str        text task: the reference answer the text rewards check
  record      dict       t2i task: the ToyWorld record the image rewards check

A `PromptSource` hands out records in a fixed order; its `get_state()` (JSON) is saved in every RL checkpoint and
`set_state()` restores it, so a resumed run draws exactly the prompts an uninterrupted one does. ToyWorld is the
built-in source; another source (e.g. prompts read from files) plugs in by implementing the three methods and being
returned by `make_prompts`.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

import numpy as np

from mmada_jax.data import toyworld as tw
from mmada_jax.diffusion import sampling_text
from mmada_jax.tokens import text_tokenizer as tt, vocab as vocab_lib


class PromptRecord(TypedDict, total=False):
  """One RL prompt (see the module docstring)."""
  id: str
  prompt_ids: list[int]
  prompt: str
  answer: str
  record: dict


class PromptSource(Protocol):
  """An ordered stream of prompt records whose position is checkpointed with the run."""

  def next(self, n: int) -> list[PromptRecord]:
    """The next n records; advances the position by n."""
    ...

  def get_state(self) -> dict:
    """The position as a JSON-serialisable dict (saved in the checkpoint's JSON item)."""
    ...

  def set_state(self, state: dict) -> None:
    """Restores a position returned by `get_state` (an empty dict: the start)."""
    ...


def cot_record(world: tw.ToyWorld, vocab: vocab_lib.Vocab, tokenizer: tt.TextTokenizer, split: str,
               index: int) -> PromptRecord:
  """A ToyWorld arithmetic word problem as a CoT chat prompt (the text task)."""
  r = world.example(split, index, render_image=False)
  text = tt.chat_text([{"role": "user", "content": tt.COT_SYSTEM_PROMPT + r["problem"]}], vocab,
                      add_generation_prompt=True)
  ids = [vocab.bos_id] + tokenizer.encode(text)
  return {"id": r["id"], "prompt_ids": ids, "prompt": r["problem"], "answer": r["problem_answer"]}


def draw_record(world: tw.ToyWorld, split: str, index: int, tokenizer: tt.TextTokenizer) -> PromptRecord:
  """A ToyWorld drawing prompt (the t2i task); the record itself goes to the image rewards."""
  r = world.example(split, index, render_image=False)
  return {"id": r["id"], "prompt_ids": tokenizer.encode(r["draw_prompt"]), "prompt": r["draw_prompt"], "record": r}


class ToyWorldPrompts:
  """ToyWorld prompts in a deterministic order (a seeded permutation per epoch): the arithmetic word problems as CoT
  chat prompts (`rl.task="text"`), or the drawing prompts (`"t2i"`).

  A `PromptSource`: `next(q)` returns q records, `get_state` / `set_state` checkpoint the position.
  `split="test"` walks the held-out split in order.
  """

  def __init__(self, config, tokenizer: tt.TextTokenizer, split: str = "train"):
    self.task = str(config.rl.task)
    self.world = tw.ToyWorld.from_config(config)
    self.vocab = vocab_lib.Vocab.from_config(config.vocab)
    self.tokenizer, self.split, self.seed = tokenizer, split, int(config.rl.seed)
    self.count = int(config.data.toyworld[f"num_{split}"])
    if self.count < 1:
      raise ValueError(f"data.toyworld.num_{split} must be >= 1 for RL prompts")
    self.position = 0
    self._order: tuple[int, np.ndarray] | None = None

  def _index(self, i: int) -> int:
    epoch, offset = divmod(i, self.count)
    if self.split != "train":
      return offset
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self.seed, 7, epoch]).permutation(self.count))
    return int(self._order[1][offset])

  def record(self, index: int) -> PromptRecord:
    """The prompt of ToyWorld example `index` of this split (no shuffling)."""
    if self.task == "t2i":
      return draw_record(self.world, self.split, index, self.tokenizer)
    return cot_record(self.world, self.vocab, self.tokenizer, self.split, index)

  def next(self, n: int) -> list[PromptRecord]:
    out = [self.record(self._index(self.position + j)) for j in range(n)]
    self.position += n
    return out

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state.get("position", 0))


def make_prompts(config, tokenizer: tt.TextTokenizer) -> PromptSource:
  """The training prompt source of a config (ToyWorld's train split)."""
  return ToyWorldPrompts(config, tokenizer)


def held_out_prompts(config, tokenizer: tt.TextTokenizer, count: int) -> list[PromptRecord]:
  """The first `count` prompts of the held-out (test) split, in order: the evaluation set."""
  held = ToyWorldPrompts(config, tokenizer, split="test")
  return [held.record(i) for i in range(count)]


def pad_prompts(prompts: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to the static `rl.prompt_len` → (ids [B, length], mask [B, length])."""
  longest = max(len(p) for p in prompts)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than rl.prompt_len={length}; raise rl.prompt_len")
  ids, mask = sampling_text.left_pad(prompts, pad_id)
  pad = length - ids.shape[1]
  return np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (pad, 0)))
