"""Sequence layouts of every MMaDA task, position for position as the official `UniversalPrompting` builds them.

Reference: mmada-official.md §3 (`training/prompting_utils.py`). With `S = data.max_text_len` and
`N = vocab.num_image_tokens`, every training sequence has length `L = S + N + 3` (S=512, N=1024 -> 1539; S=128, N=256
-> 387), so the t2i, lm and mmu parts of a step can be concatenated along the batch axis (§4.3).

Every builder takes token ids (text from `TextTokenizer.encode`, images as codebook indices in `[0, codebook_size)`)
and returns a dict of 1-D NumPy int32 arrays of length L (inference layouts: the prompt's own length):

  input_ids    the token ids.
  labels       training targets, `IGNORE_ID` (-100) where the official code puts it.
  valid_mask   the official `attention_mask` of that layout (1 = real token). For lm/mmu the official mask is computed
               after padding and is therefore all ones (§3.3); `valid_mask_all_ones=False` marks real tokens instead.
  prompt_mask  1 at positions the on-device corruption must leave alone (the official `prompt_masks` for lm_chat, mmu
               and r2i; for t2i the text prefix and `<|soi|>`/`<|eoi|>`; all zeros for lm).

Image corruption happens on device (DESIGN.md Decision 6), so t2i returns the clean image ids in `input_ids` and in
`labels`; the train step turns unmasked image labels into -100 (§4.1). Passing `image_mask` reproduces the official
host-side output for a given mask instead (used to check against the parity fixtures).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mmada_jax.tokens import vocab as vocab_lib

IGNORE_ID = -100  # official `ignore_id`
DTYPE = np.int32


@dataclasses.dataclass(frozen=True)
class Prompter:
  """Builds the official layouts for one vocabulary and one (S, N).

  Attributes:
    vocab: token ids.
    max_text_len: S, text positions of the t2i prefix (plus the task token) and of the mmu text part.
    num_image_tokens: N, image tokens per image.
    valid_mask_all_ones: reproduce the all-ones lm/mmu `attention_mask` of the official code (§3.3, §8.17).
  """

  vocab: vocab_lib.Vocab
  max_text_len: int
  num_image_tokens: int
  valid_mask_all_ones: bool = True

  def __post_init__(self):
    if self.max_text_len < 2:
      raise ValueError(f"max_text_len (S) must be >= 2 to hold BOS and EOS, got {self.max_text_len}")
    if self.num_image_tokens < 1:
      raise ValueError(f"num_image_tokens (N) must be positive, got {self.num_image_tokens}")

  @classmethod
  def from_config(cls, config) -> "Prompter":
    return cls(vocab=vocab_lib.Vocab.from_config(config.vocab), max_text_len=int(config.data.max_text_len),
               num_image_tokens=int(config.vocab.num_image_tokens),
               valid_mask_all_ones=bool(config.data.valid_mask_all_ones))

  @property
  def seq_len(self) -> int:
    """L = S + N + 3, the length of every training sequence."""
    return self.max_text_len + self.num_image_tokens + 3

  # ---- helpers -----------------------------------------------------------------------------------------------------

  def _with_bos(self, text_ids: Sequence[int]) -> list[int]:
    """Empty text -> [BOS]; otherwise BOS is prepended unless the text already starts with it (official, §3)."""
    ids = [int(i) for i in text_ids]
    if not ids:
      return [self.vocab.bos_id]
    return ids if ids[0] == self.vocab.bos_id else [self.vocab.bos_id] + ids

  def _image_ids(self, image_codes: Sequence[int]) -> np.ndarray:
    codes = np.asarray(image_codes)
    if codes.shape != (self.num_image_tokens,):
      raise ValueError(f"expected {self.num_image_tokens} image codes, got shape {codes.shape}")
    return self.vocab.image_ids(codes)

  def _eos_padded_text(self, text_ids: Sequence[int], length: int) -> tuple[list[int], int]:
    """`[BOS] text [EOS]` right-padded with EOS to `length`, or cut to `text[:length-1] + [EOS]` (mmu/r2i, §3.5).

    Returns the ids and the number of real tokens (before padding).
    """
    ids = self._with_bos(text_ids) + [self.vocab.eos_id]
    if len(ids) <= length:
      return ids + [self.vocab.eos_id] * (length - len(ids)), len(ids)
    return ids[:length - 1] + [self.vocab.eos_id], length

  def _last_end_header(self, ids: Sequence[int]) -> int:
    """Index of the last `<|end_header_id|>` in `ids`, or -1."""
    hits = np.flatnonzero(np.asarray(ids) == self.vocab.end_header_id)
    return int(hits[-1]) if hits.size else -1

  # ---- text-to-image (§3.1, §3.2) ----------------------------------------------------------------------------------

  def t2i_prefix(self, text_ids: Sequence[int], drop_condition: bool = False) -> tuple[list[int], int]:
    """The S+1 text positions of a t2i sequence and the number of [iPAD] in front.

    `core = [<|t2i|>, BOS, text, EOS]` (or the null prompt `[<|t2i|>, BOS, EOS]` when `drop_condition`), left-padded
    with [iPAD] to S+1, or cut to `core[:S] + [EOS]`.
    """
    v, width = self.vocab, self.max_text_len + 1
    core = [v.t2i_id, v.bos_id, v.eos_id] if drop_condition else [v.t2i_id] + self._with_bos(text_ids) + [v.eos_id]
    if len(core) <= width:
      return [v.ipad_id] * (width - len(core)) + core, width - len(core)
    return core[:width - 1] + [v.eos_id], 0

  def t2i(self, text_ids: Sequence[int], image_codes: Sequence[int], drop_condition: bool = False,
          image_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """t2i training layout `[iPAD]* <|t2i|> BOS text EOS <|soi|> img_1..img_N <|eoi|>`, all arrays `[L]`.

    Args:
      text_ids: caption ids (BOS optional).
      image_codes: `[N]` codebook indices.
      drop_condition: replace the caption by the null prompt (classifier-free-guidance dropout, drawn by the caller
        with probability `data.cond_dropout_prob`).
      image_mask: optional `[N]` bool; True positions become [MASK] in `input_ids` and keep their label, False positions
        get label -100 (the official output after `mask_or_random_replace_tokens`). None = clean ids and labels.
    """
    v = self.vocab
    prefix, n_pad = self.t2i_prefix(text_ids, drop_condition)
    image = self._image_ids(image_codes)
    image_in, image_labels = image, image
    if image_mask is not None:
      image_mask = np.asarray(image_mask, bool)
      image_in = np.where(image_mask, v.mask_id, image)
      image_labels = np.where(image_mask, image, IGNORE_ID)
    prefix_arr = np.asarray(prefix)
    input_ids = np.concatenate([prefix_arr, [v.soi_id], image_in, [v.eoi_id]])
    prefix_labels = np.where(prefix_arr == v.ipad_id, IGNORE_ID, prefix_arr)
    labels = np.concatenate([prefix_labels, [v.soi_id], image_labels, [v.eoi_id]])
    valid = np.ones(self.seq_len, DTYPE)
    valid[:n_pad] = 0
    prompt = np.ones(self.seq_len, DTYPE)
    prompt[self.max_text_len + 2:self.max_text_len + 2 + self.num_image_tokens] = 0
    return dict(input_ids=input_ids.astype(DTYPE), labels=labels.astype(DTYPE), valid_mask=valid, prompt_mask=prompt)

  def t2i_gen(self, text_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """t2i inference layout (§3.2): the t2i sequence with every image position [MASK]; `input_ids`, `valid_mask` `[L]`.

    The classifier-free-guidance unconditional prompt is `t2i_gen([])` (same as the training null prompt).
    """
    v = self.vocab
    prefix, n_pad = self.t2i_prefix(text_ids)
    input_ids = np.concatenate([prefix, [v.soi_id], np.full(self.num_image_tokens, v.mask_id), [v.eoi_id]])
    valid = np.ones(self.seq_len, DTYPE)
    valid[:n_pad] = 0
    return dict(input_ids=input_ids.astype(DTYPE), valid_mask=valid)

  # ---- text (§3.3, §3.4) -------------------------------------------------------------------------------------------

  def lm(self, text_ids: Sequence[int], max_seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Pre-training text `BOS text EOS EOS...` (`[max_seq_len]`, default L); labels = ids, padding included.

    Longer texts are cut to `max_seq_len` without an EOS (§3.3, §8.17). No task token, nothing is prompt.
    """
    length = self.seq_len if max_seq_len is None else int(max_seq_len)
    ids = self._with_bos(text_ids) + [self.vocab.eos_id]
    real = min(len(ids), length)
    ids = ids[:length] + [self.vocab.eos_id] * (length - len(ids))
    arr = np.asarray(ids, DTYPE)
    valid = np.ones(length, DTYPE)
    if not self.valid_mask_all_ones:
      valid[real:] = 0
    return dict(input_ids=arr, labels=arr.copy(), valid_mask=valid, prompt_mask=np.zeros(length, DTYPE))

  def lm_chat(self, text_ids: Sequence[int], max_seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Instruction / CoT text: the `lm` layout plus `prompt_mask` = 1 up to and including the last
    `<|end_header_id|>` of the (cut) sequence, 0 prompt positions when there is none (§3.4)."""
    out = self.lm(text_ids, max_seq_len)
    p = self._last_end_header(out["input_ids"])
    out["prompt_mask"][:p + 1] = 1
    return out

  # ---- multimodal understanding (§3.5, §3.6) -----------------------------------------------------------------------

  def mmu(self, image_codes: Sequence[int], text_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """mmu training layout `<|mmu|> <|soi|> img_1..img_N <|eoi|> BOS text EOS EOS...`, all arrays `[L]`.

    `text_ids` = tokenised question + answer (`mmu_text`). Labels are -100 on the first N+3 positions, the text ids
    after (an [iPAD] id inside the text would also become -100, as officially). `prompt_mask` covers the task token,
    image, and the text up to its last `<|end_header_id|>` (only the first N+3 positions when there is none).
    """
    v, n = self.vocab, self.num_image_tokens
    text, real = self._eos_padded_text(text_ids, self.max_text_len)
    text_arr = np.asarray(text)
    input_ids = np.concatenate([[v.mmu_id, v.soi_id], self._image_ids(image_codes), [v.eoi_id], text_arr])
    text_labels = np.where(text_arr == v.ipad_id, IGNORE_ID, text_arr)
    labels = np.concatenate([np.full(n + 3, IGNORE_ID), text_labels])
    prompt = np.zeros(self.seq_len, DTYPE)
    prompt[:n + 3 + self._last_end_header(text) + 1] = 1
    valid = np.ones(self.seq_len, DTYPE)
    if not self.valid_mask_all_ones:
      valid[n + 3 + real:] = 0
    return dict(input_ids=input_ids.astype(DTYPE), labels=labels.astype(DTYPE), valid_mask=valid, prompt_mask=prompt)

  def mmu_gen(self, image_codes: Sequence[int], prompt_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """mmu inference prompt (§3.6): `<|mmu|> <|soi|> img <|eoi|> BOS prompt`, unpadded, `[N + 4 + len(prompt)]`.

    `prompt_ids` = tokenised `mmu_text(question, "")` (training-consistent) or `chat_text(..., add_generation_prompt=
    True)`. The caller appends the answer region as [MASK]s; `prompt_mask` is all ones.
    """
    v = self.vocab
    ids = np.concatenate([[v.mmu_id, v.soi_id], self._image_ids(image_codes), [v.eoi_id], self._with_bos(prompt_ids)])
    return dict(input_ids=ids.astype(DTYPE), prompt_mask=np.ones(len(ids), DTYPE))

  # ---- reasoning then image (§3.7) ---------------------------------------------------------------------------------

  def r2i(self, image_codes: Sequence[int], text_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Reasoning-to-image layout `<|r2i|> BOS text EOS... <|soi|> img_1..img_N <|eoi|>`, all arrays `[L]`.

    The text (prompt + reasoning, EOS-padded to S) is followed by the image. `prompt_mask` covers the task token, the
    text up to its last `<|end_header_id|>` (all of it when there is none), `<|soi|>` and `<|eoi|>`, so the reasoning
    and the image are generated. Labels are the ids themselves (official `r2i_prompt` returns the sequence as labels).
    """
    v, s, n = self.vocab, self.max_text_len, self.num_image_tokens
    text, real = self._eos_padded_text(text_ids, s)
    ids = np.concatenate([[v.r2i_id], text, [v.soi_id], self._image_ids(image_codes), [v.eoi_id]]).astype(DTYPE)
    prompt = np.zeros(self.seq_len, DTYPE)
    prompt[0] = 1
    p = self._last_end_header(text)
    prompt[1:(p + 2 if p >= 0 else s + 1)] = 1
    prompt[s + 1] = 1
    prompt[s + 2 + n] = 1
    valid = np.ones(self.seq_len, DTYPE)
    if not self.valid_mask_all_ones:
      valid[1 + real:s + 1] = 0
    return dict(input_ids=ids, labels=ids.copy(), valid_mask=valid, prompt_mask=prompt)


def draw_cond_dropout(rng: np.random.Generator, prob: float) -> bool:
  """One per-sample condition-dropout decision (official: `torch.rand() < cond_dropout_prob`, §3.1)."""
  return bool(rng.random() < prob)


def stack(records: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks per-example layouts into `[batch, length]` arrays (all records must have the same keys and length)."""
  if not records:
    raise ValueError("stack() needs at least one record")
  keys = records[0].keys()
  for i, r in enumerate(records):
    if r.keys() != keys:
      raise ValueError(f"record {i} has keys {sorted(r)}, expected {sorted(keys)}")
  return {k: np.stack([r[k] for r in records]) for k in keys}
