"""Raw records of every source kind -> examples (text, image or image codes, id): the first half of the per-record
transform of the pipelines (`data.pipelines`), and the `Context` it runs with."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np

from mmada_jax.data import sources as src_lib
from mmada_jax.data import toyworld as tw
from mmada_jax.tokens import prompting
from mmada_jax.tokens import text_tokenizer as tt

CAPTION_PROMPT = "Please describe this image in detail."  # the official default captioning prompt (§3.6)
ImageEncoder = Callable[[np.ndarray], np.ndarray]  # [H, W, 3] uint8 -> [N] codes


@dataclasses.dataclass(frozen=True)
class Bad:
  """Stands in for a record that was skipped; SkipBad counts and drops it."""

  record_id: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Context:
  """Everything the per-record transform needs (picklable, so grain workers can use it)."""

  task: str
  kind: str
  variant: str
  prompter: prompting.Prompter
  tokenizer: tt.TextTokenizer
  image_encoder: ImageEncoder | None
  resolution: int
  cond_dropout_prob: float
  mmu_literal_eot: bool
  lm_max_chars: int
  lm_seq_len: int  # length of the lm rows (data.lm_seq_len resolved: 0 -> L)
  drop_long_captions: bool
  strict: bool


# ----------------------------------------------------------------------------------------------------------------------
# Record -> (text, image) per source kind


def _s(value: Any) -> Any:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _toyworld_example(raw: dict, ctx: Context) -> dict:
  rec = {k: _s(v) for k, v in raw.items()}
  v = ctx.prompter.vocab
  if ctx.task == "t2i":
    return dict(text=rec["draw_prompt"], image=rec["image"])
  if ctx.task == "lm":
    chat = ctx.variant == "chat"
    return dict(text=tw.chat_problem_text(rec, v) if chat else rec["lm_text"], plain=not chat)
  return dict(text=tw.mmu_task_text(rec, v, cot=ctx.variant == "cot", literal_eot=ctx.mmu_literal_eot),
              image=rec["image"])


def _chat_messages(conversations: Sequence[dict], rid: str) -> list[dict]:
  """LLaVA `conversations` -> chat messages, `<image>` placeholders removed (official stage-4 VQA data, §3.5)."""
  out = []
  for turn in conversations:
    if not isinstance(turn, dict) or "value" not in turn:
      raise src_lib.BadRecordError(rid, "invalid conversation", repr(turn)[:80])
    role = "user" if turn.get("from", turn.get("role")) in ("human", "user") else "assistant"
    text = str(turn["value"]).replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
    out.append({"role": role, "content": text})
  if not out or not any(m["content"].strip() for m in out):
    raise src_lib.BadRecordError(rid, "empty text", "conversations")
  return out


def _row_example(row: dict, ctx: Context, rid: str) -> dict:
  """A JSON / Parquet / webdataset-json row: text, chat, image-caption or VQA fields."""
  v = ctx.prompter.vocab
  image = row.get("image_codes")
  if image is None and ctx.task != "lm":
    ref = row.get("image", row.get("image_path"))
    if ref is None:
      raise src_lib.BadRecordError(rid, "missing image", "no 'image' field")
    image = os.path.join(row.get("dir", ""), ref) if isinstance(ref, str) else ref
  if ctx.task == "lm":
    if "messages" in row:
      return dict(text=tt.chat_text(row["messages"], v))
    if "question" in row and "answer" in row:  # GSM8K-style rows
      return dict(text=_gsm8k_chat(row, v, rid))
    return dict(text=src_lib.decode_text(row.get("text", row.get("content")), rid), plain=True)
  if ctx.task == "t2i":
    return dict(text=src_lib.decode_text(row.get("caption", row.get("text", row.get("txt"))), rid, "caption"),
                image=image, codes=row.get("image_codes"))
  if "conversations" in row:
    text = tt.chat_text(_chat_messages(row["conversations"], rid), v)
  elif "question" in row:
    text = tt.mmu_text(src_lib.decode_text(row["question"], rid, "question"), _s(row.get("answer", "")), v,
                       literal_eot=ctx.mmu_literal_eot)
  else:
    caption = src_lib.decode_text(row.get("caption", row.get("text", row.get("txt"))), rid, "caption")
    text = tt.mmu_text(CAPTION_PROMPT, caption, v, literal_eot=ctx.mmu_literal_eot)
  return dict(text=text, image=image, codes=row.get("image_codes"))


def _gsm8k_chat(row: dict, vocab, rid: str) -> str:
  question = src_lib.decode_text(row["question"], rid, "question")
  reasoning, final = src_lib.gsm8k_parts(src_lib.decode_text(row["answer"], rid, "answer"), rid)
  return tt.chat_text([{"role": "user", "content": tt.COT_SYSTEM_PROMPT + question},
                       {"role": "assistant", "content": tt.cot_answer(reasoning, final, vocab)}], vocab)


def _wds_row(raw: dict, rid: str) -> dict:
  row = src_lib.parse_json(raw["json"], rid) if "json" in raw else {}
  image = next((raw[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in raw), None)
  if image is not None:
    row["image"] = image
  for ext in ("txt", "caption"):
    if ext in raw:
      row["caption"] = src_lib.decode_text(raw[ext], rid, ext)
  return row


def to_example(raw: dict, ctx: Context) -> dict:
  rid = str(_s(raw.get("id", "?")))
  if ctx.kind == "toyworld" or (ctx.kind == "tfds" and "draw_prompt" in raw):
    ex = _toyworld_example(raw, ctx)
  elif ctx.kind in ("jsonl", "gsm8k"):
    row = src_lib.parse_json(raw["raw"], rid)
    ex = _row_example(dict(row, dir=raw["dir"]), ctx, rid)
  elif ctx.kind in ("parquet", "list"):
    ex = _row_example(raw, ctx, rid)
  elif ctx.kind == "images":
    caption = _read_caption(raw["caption_path"], rid)
    ex = _row_example({"caption": caption, "image": raw["image_path"]}, ctx, rid)
  elif ctx.kind == "wds":
    ex = _row_example(_wds_row(raw, rid), ctx, rid)
  elif ctx.kind == "llava":
    item = raw["item"]
    if not isinstance(item, dict) or "image" not in item:
      raise src_lib.BadRecordError(rid, "missing image", "LLaVA sample without 'image'")
    ex = _row_example({"conversations": item.get("conversations", []), "image": item["image"], "dir": raw["dir"]},
                      ctx, rid)
  elif ctx.kind == "tokens":  # written by `mmada-jax prepare`: text ids and image codes, no decoding
    ex = dict(text=_s(raw.get("text", "")), text_ids=raw["text_ids"], codes=raw["image_codes"])
  elif ctx.kind == "tfds":
    caption = _s(raw.get("label_name", raw.get("caption", raw.get("text"))))
    if isinstance(caption, str):
      caption = caption.replace("_", " ")
    ex = _row_example({"caption": caption, "image": raw.get("image"), "image_codes": raw.get("image_codes")}, ctx, rid)
  else:
    raise ValueError(f"unknown source kind {ctx.kind!r}")
  ex["id"] = rid
  return ex


def _read_caption(path: str, rid: str) -> str:
  try:
    with open(path, "rb") as fh:
      return src_lib.decode_text(fh.read(), rid, os.path.basename(path))
  except FileNotFoundError as e:
    raise src_lib.BadRecordError(rid, "missing caption", path) from e
