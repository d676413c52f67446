"""Text tokenizer: a thin wrapper over Hugging Face `tokenizers`, plus the official chat / CoT text formats.

Two ways to get one:
* `TextTokenizer.from_dir(path, vocab)` loads `tokenizer.json` from a directory holding the official LLaDA / MMaDA
  tokenizer files (or any tokenizer saved by this module) and checks that the special token strings map to the ids of
  the config (mmada-official.md §9.2).
* `train_toy_tokenizer(texts, vocab)` trains a small byte-level BPE for ToyWorld whose special tokens sit exactly at
  the ids of the config's (toy) vocab section, and whose ordinary tokens fill the remaining text ids. Byte-level means
  every string can be encoded (no unknown token), so the same tokenizer also serves real-data sources in small runs.

`encode` never adds BOS/EOS: the sequence layouts (`tokens/prompting.py`) add them, as the official `UniversalPrompting`
does (§3: "prepends BOS if the first id is not BOS").
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mmada_jax.tokens import vocab as vocab_lib

TOKENIZER_FILE = "tokenizer.json"

# The CoT instruction the official Mix-CoT data prepends to the question (mmada-official.md §3.5,
# training/data.py:411); it ends with a newline, and the question that follows is also closed by a newline.
COT_SYSTEM_PROMPT = ("You should first think about the reasoning process in the mind and then provide the user with "
                     "the answer. The reasoning process is enclosed within <think> </think> tags, i.e. <think> "
                     "reasoning process here </think> answer here\n")
# The literal (mistyped) end-of-turn text of the official mmu training prompts (§8.10); tokenised as ordinary text.
LITERAL_EOT = "<eot_id>"


class TextTokenizer:
  """A `tokenizers.Tokenizer` whose special tokens agree with a `Vocab`.

  Attributes:
    tokenizer: the underlying `tokenizers.Tokenizer`.
    vocab: the vocabulary facts it was checked against.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, vocab: vocab_lib.Vocab, source: str = "<memory>"):
    self.tokenizer = tokenizer
    self.vocab = vocab
    self.source = source
    self._check_special_tokens()

  # ---- construction ------------------------------------------------------------------------------------------------

  @classmethod
  def from_dir(cls, path: str, vocab: vocab_lib.Vocab) -> "TextTokenizer":
    """Loads `<path>/tokenizer.json` (or `path` itself when it is a file)."""
    file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path!r} (a directory with the official LLaDA/MMaDA tokenizer "
                              f"files, or one written by TextTokenizer.save)")
    try:
      tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({e})") from e
    return cls(tok, vocab, source=file)

  @classmethod
  def from_config(cls, config) -> "TextTokenizer":
    """The tokenizer a config names: `config.data.tokenizer_dir`, which must be set (ToyWorld builds its own)."""
    vocab = vocab_lib.Vocab.from_config(config.vocab)
    if not config.data.tokenizer_dir:
      raise ValueError("data.tokenizer_dir is empty: point it to a directory with tokenizer.json, or use "
                       "mmada_jax.data.toyworld.toy_tokenizer() for ToyWorld")
    return cls.from_dir(config.data.tokenizer_dir, vocab)

  def save(self, path: str) -> str:
    """Writes `<path>/tokenizer.json`; returns the file name."""
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, TOKENIZER_FILE)
    self.tokenizer.save(file)
    return file

  def _check_special_tokens(self) -> None:
    """The strings that appear inside text must be single tokens with the config's ids."""
    v = self.vocab
    problems = []
    for field, id_field in (("mask_token", "mask_id"), ("start_header_token", "start_header_id"),
                            ("end_header_token", "end_header_id"), ("eot_token", "eot_id")):
      token = getattr(v, field)
      got = self.tokenizer.token_to_id(token)
      if got != getattr(v, id_field):
        problems.append(f"{token!r} has id {got}, config vocab.{id_field}={getattr(v, id_field)}")
    size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    if size > v.text_vocab_size:
      problems.append(f"tokenizer has {size} tokens, more than vocab.text_vocab_size={v.text_vocab_size}")
    if problems:
      raise ValueError(f"tokenizer {self.source} does not match the config vocab: " + "; ".join(problems))

  # ---- use ---------------------------------------------------------------------------------------------------------

  def __len__(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added; special token strings inside the text become their ids)."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; image ids and ids beyond the tokenizer are dropped."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab.text_vocab_size]
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(int(token_id))


# ----------------------------------------------------------------------------------------------------------------------
# Text formats (mmada-official.md §3.4-3.6, §8.10-11)


def chat_text(messages: Sequence[dict], vocab: vocab_lib.Vocab, add_generation_prompt: bool = False) -> str:
  """The official chat format without the leading BOS (the layouts add BOS as an id).

  Each message becomes `<|start_header_id|>{role}<|end_header_id|>\\n{content.strip()}<|eot_id|>` — a single newline
  after the header (§8.11); `add_generation_prompt` appends the assistant header and its newline.

  Args:
    messages: `[{"role": "user"|"assistant"|"system", "content": str}, ...]`.
  """
  parts = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
    parts.append(f"{vocab.start_header_token}{m['role']}{vocab.end_header_token}\n{str(m['content']).strip()}"
                 f"{vocab.eot_token}")
  if add_generation_prompt:
    parts.append(f"{vocab.start_header_token}assistant{vocab.end_header_token}\n")
  return "".join(parts)


def mmu_text(question: str, answer: str, vocab: vocab_lib.Vocab, literal_eot: bool = True, cot: bool = False) -> str:
  """Text part of an mmu training sample as the official caption / VQA data writes it (§3.5).

  `<|start_header_id|>user<|end_header_id|>\\n{question}<eot_id>`
  `<|start_header_id|>assistant<|end_header_id|>\\n{answer}`
  With `literal_eot` (official default, §8.10) the turn ends with the ordinary text `<eot_id>`, else with the real
  `<|eot_id|>`. With `cot` the CoT instruction precedes the question and a newline follows it (training/data.py).
  With an empty `answer` this is the inference prompt of §3.6 (training-consistent variant).
  """
  eot = LITERAL_EOT if literal_eot else vocab.eot_token
  user = f"{COT_SYSTEM_PROMPT}{question}\n" if cot else question
  return (f"{vocab.start_header_token}user{vocab.end_header_token}\n{user}{eot}"
          f"{vocab.start_header_token}assistant{vocab.end_header_token}\n{answer}")


def cot_answer(reasoning: str, answer: str, vocab: vocab_lib.Vocab) -> str:
  """`<think>{reasoning}</think>{answer}` — the response format the CoT instruction asks for."""
  return f"{vocab.think_open}{reasoning}{vocab.think_close}{answer}"


def split_cot_answer(text: str, vocab: vocab_lib.Vocab) -> tuple[str | None, str]:
  """Splits a response into (reasoning, answer); reasoning is None when the `<think>...</think>` block is missing."""
  start = text.find(vocab.think_open)
  end = text.find(vocab.think_close, start + len(vocab.think_open)) if start >= 0 else -1
  if start < 0 or end < 0:
    return None, text.strip()
  return text[start + len(vocab.think_open):end], text[end + len(vocab.think_close):].strip()


# ----------------------------------------------------------------------------------------------------------------------
# Training the ToyWorld tokenizer


def _special_strings(vocab: vocab_lib.Vocab) -> dict[int, str]:
  """`{id: token string}` of every special id of `vocab`."""
  names = {vocab.mask_id: vocab.mask_token, vocab.start_header_id: vocab.start_header_token,
           vocab.end_header_id: vocab.end_header_token, vocab.eot_id: vocab.eot_token}
  for field, name in vocab_lib.SPECIAL_TOKEN_NAMES.items():
    names[int(getattr(vocab, field))] = name
  return names


def _strip_specials(texts: Iterable[str], specials: Sequence[str]) -> Iterable[str]:
  for text in texts:
    for s in specials:
      text = text.replace(s, " ")
    yield text


def train_toy_tokenizer(texts: Iterable[str], vocab: vocab_lib.Vocab, min_frequency: int = 2) -> TextTokenizer:
  """Trains a byte-level BPE on `texts` and lays it out on the ids of `vocab`.

  The special tokens get their config ids; `<think>` / `</think>` become single ordinary tokens (decoded as text);
  learnt tokens fill the remaining text ids in training order; unused ids get `<|unused_k|>` placeholders that no
  text produces. Digits are split one per token (easier arithmetic for tiny models). Deterministic given `texts`.
  """
  specials = _special_strings(vocab)
  free_ids = [i for i in range(vocab.text_vocab_size) if i not in specials]
  markers = [vocab.think_open, vocab.think_close]
  budget = len(free_ids) - len(markers)
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if budget < len(alphabet):
    raise ValueError(f"text vocabulary too small for a byte-level BPE: {budget} free ids < {len(alphabet)} bytes")
  base = tokenizers.Tokenizer(models.BPE())
  base.pre_tokenizer = _pre_tokenizer()
  trainer = trainers.BpeTrainer(vocab_size=budget, min_frequency=min_frequency, initial_alphabet=alphabet,
                                show_progress=False, special_tokens=[])
  base.train_from_iterator(_strip_specials(texts, list(specials.values()) + markers), trainer)
  model = json.loads(base.to_str())["model"]
  learnt = sorted(model["vocab"].items(), key=lambda kv: kv[1])
  new_vocab = {}
  ids = iter(free_ids)
  for token, _ in learnt:
    new_vocab[token] = next(ids)
  for marker in markers:
    new_vocab[marker] = next(ids)
  for k, i in enumerate(ids):
    new_vocab[f"<|unused_{k}|>"] = i
  for i, s in specials.items():
    new_vocab[s] = i
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  tok = tokenizers.Tokenizer(models.BPE(vocab=new_vocab, merges=merges))
  tok.pre_tokenizer = _pre_tokenizer()
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials.values()])
  tok.add_tokens([tokenizers.AddedToken(m, special=False, normalized=False) for m in markers])
  return TextTokenizer(tok, vocab, source="<trained toy tokenizer>")


def _pre_tokenizer():
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
