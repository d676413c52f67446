"""Vocabulary facts of the unified text + image token space, read from the config's `vocab` section.

The model sees one id space (mmada-official.md §1.7): text ids `[0, text_vocab_size)` (special tokens included), then
image ids `image_offset + code` for `code` in `[0, codebook_size)`. Nothing in the package hard-codes an id (DESIGN.md
Decision 4); code takes a `Vocab` built with `Vocab.from_config(config.vocab)`.

`toy_vocab_values()` gives the layout of the small vocabulary the ToyWorld tokenizer is trained for: the ordinary text
tokens first, then the special tokens in the official order, then the image codes (as in the 8B model, where the image
ids follow the tokenizer's ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# Integer ids of the vocab section, in the order the toy layout places the special ones after the ordinary text ids.
SPECIAL_ID_FIELDS = ("bos_id", "eos_id", "soi_id", "eoi_id", "sov_id", "eov_id", "t2i_id", "mmu_id", "t2v_id", "v2v_id",
                     "lvg_id", "ipad_id", "r2i_id", "mask_id", "start_header_id", "end_header_id", "eot_id")
TOKEN_STRING_FIELDS = ("mask_token", "start_header_token", "end_header_token", "eot_token", "think_open", "think_close")
# Names the toy tokenizer gives the special ids (the official tokenizer maps task tokens to reserved ids instead).
SPECIAL_TOKEN_NAMES = {
    "bos_id": "<|startoftext|>", "eos_id": "<|endoftext|>", "soi_id": "<|soi|>", "eoi_id": "<|eoi|>",
    "sov_id": "<|sov|>", "eov_id": "<|eov|>", "t2i_id": "<|t2i|>", "mmu_id": "<|mmu|>", "t2v_id": "<|t2v|>",
    "v2v_id": "<|v2v|>", "lvg_id": "<|lvg|>", "ipad_id": "[iPAD]", "r2i_id": "<|r2i|>",
}


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Token ids and token strings of one model's vocabulary (all values from `config.vocab`)."""

  text_vocab_size: int
  llm_vocab_size: int
  codebook_size: int
  image_offset: int
  num_image_tokens: int
  mask_id: int
  bos_id: int
  eos_id: int
  pad_id: int
  soi_id: int
  eoi_id: int
  sov_id: int
  eov_id: int
  t2i_id: int
  mmu_id: int
  t2v_id: int
  v2v_id: int
  lvg_id: int
  ipad_id: int
  r2i_id: int
  start_header_id: int
  end_header_id: int
  eot_id: int
  mask_token: str = "<|mdm_mask|>"
  start_header_token: str = "<|start_header_id|>"
  end_header_token: str = "<|end_header_id|>"
  eot_token: str = "<|eot_id|>"
  think_open: str = "<think>"
  think_close: str = "</think>"

  def __post_init__(self):
    problems = []
    for name in SPECIAL_ID_FIELDS + ("pad_id",):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or not 0 <= value < self.text_vocab_size:
        problems.append(f"{name}={value!r} is not a text id in [0, text_vocab_size={self.text_vocab_size})")
    ids = [getattr(self, n) for n in SPECIAL_ID_FIELDS]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
      names = [n for n in SPECIAL_ID_FIELDS if getattr(self, n) in dupes]
      problems.append(f"special ids must be distinct, {names} share {dupes}")
    if self.image_offset < self.text_vocab_size:
      problems.append(f"image_offset={self.image_offset} overlaps the text ids [0, {self.text_vocab_size})")
    if self.codebook_size <= 0 or self.num_image_tokens <= 0:
      problems.append("codebook_size and num_image_tokens must be positive")
    if problems:
      raise ValueError("invalid vocab: " + "; ".join(problems))

  @classmethod
  def from_config(cls, vocab_config: Mapping[str, Any]) -> "Vocab":
    """Builds a Vocab from a `config.vocab` section (a ConfigDict or a plain dict); unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(vocab_config.items()) if hasattr(vocab_config, "items") else dict(vocab_config)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"vocab config has keys Vocab does not know: {unknown}")
    missing = sorted(f for f in fields if f not in values and
                     next(x for x in dataclasses.fields(cls) if x.name == f).default is dataclasses.MISSING)
    if missing:
      raise ValueError(f"vocab config lacks keys: {missing}")
    return cls(**values)

  # ---- image ids ---------------------------------------------------------------------------------------------------

  @property
  def image_end(self) -> int:
    """One past the last image id (`image_offset + codebook_size`)."""
    return self.image_offset + self.codebook_size

  @property
  def min_model_rows(self) -> int:
    """The smallest embedding / LM-head row count that holds every text and image id."""
    return max(self.image_end, self.llm_vocab_size)

  def image_ids(self, codes: np.ndarray) -> np.ndarray:
    """Image codes `[...]` in `[0, codebook_size)` -> token ids `[...]` (raises on out-of-range codes)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got range [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int64) + self.image_offset

  def image_codes(self, ids: np.ndarray) -> np.ndarray:
    """Token ids `[...]` that are image ids -> codes `[...]` (raises if any id is not an image id)."""
    ids = np.asarray(ids)
    if ids.size and not self.is_image(ids).all():
      bad = ids[~self.is_image(ids)]
      raise ValueError(f"ids {bad[:8].tolist()} are not image ids [{self.image_offset}, {self.image_end})")
    return ids.astype(np.int64) - self.image_offset

  def is_image(self, ids: np.ndarray) -> np.ndarray:
    """Boolean `[...]`: the id is an image token."""
    ids = np.asarray(ids)
    return (ids >= self.image_offset) & (ids < self.image_end)

  def is_text(self, ids: np.ndarray) -> np.ndarray:
    """Boolean `[...]`: the id is a text id (special tokens and [MASK] included)."""
    ids = np.asarray(ids)
    return (ids >= 0) & (ids < self.text_vocab_size)

  def is_special(self, ids: np.ndarray) -> np.ndarray:
    """Boolean `[...]`: the id is one of the special ids (BOS/EOS, task tokens, [iPAD], [MASK], chat headers)."""
    return np.isin(np.asarray(ids), np.asarray(self.special_ids()))

  def special_ids(self) -> tuple[int, ...]:
    return tuple(int(getattr(self, n)) for n in SPECIAL_ID_FIELDS)

  def special_id_map(self) -> dict[str, int]:
    """`{field name: id}` of every special id (e.g. `{"bos_id": 126080, ...}`)."""
    return {n: int(getattr(self, n)) for n in SPECIAL_ID_FIELDS}


def toy_vocab_values(num_plain_tokens: int = 495, codebook_size: int = 64, num_image_tokens: int = 256) -> dict:
  """Values of a `vocab` section for a small model whose tokenizer the package trains (ToyWorld).

  Layout: ordinary text ids `[0, num_plain_tokens)`, then the 17 special ids in `SPECIAL_ID_FIELDS` order (so
  `text_vocab_size = num_plain_tokens + 17`), then the image ids starting right after the text ids. With the defaults
  there are 512 text ids and 512 + 64 = 576 model rows. The padding id is EOS, as officially.
  """
  if num_plain_tokens < 1:
    raise ValueError(f"num_plain_tokens must be positive, got {num_plain_tokens}")
  values = {name: num_plain_tokens + i for i, name in enumerate(SPECIAL_ID_FIELDS)}
  text_vocab_size = num_plain_tokens + len(SPECIAL_ID_FIELDS)
  values.update(pad_id=values["eos_id"], text_vocab_size=text_vocab_size, llm_vocab_size=text_vocab_size,
                codebook_size=codebook_size, image_offset=text_vocab_size, num_image_tokens=num_image_tokens)
  return values


def apply_toy_vocab(config, **kwargs):
  """Sets `config.vocab` to `toy_vocab_values(**kwargs)`, `config.model.vocab_size` to the rows needed and
  `config.magvit.codebook_bits` to match the codebook (when it is a power of two). Returns the config."""
  values = toy_vocab_values(**kwargs)
  for key, value in values.items():
    config.vocab[key] = value
  config.model.vocab_size = values["image_offset"] + values["codebook_size"]
  bits = int(values["codebook_size"]).bit_length() - 1
  if 2 ** bits == values["codebook_size"]:
    config.magvit.codebook_bits = bits
  return config
