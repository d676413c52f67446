"""ToyWorld held-out accuracy of a sampler, per task (the library behind `mmada-jax eval` and the periodic
evaluation of training runs).

What each task measures on records `start .. start + count - 1` of the ToyWorld `test` split (its own fixed seed:
never seen in training), the sampler settings and the chance baselines are described in `mmada_jax/cli/eval.py`
(`mmada-jax eval --help`); `evaluate` returns the result dict that `write_outputs` stores as JSON, a markdown table
and a PNG grid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from collections import Counter, defaultdict
from typing import Callable, Sequence

import jax
import numpy as np

from mmada_jax.data import toyworld as tw, toyworld_checkers as checkers
from mmada_jax.inference import presets
from mmada_jax.models import image_io

TASKS = ("text", "mmu", "t2i")
TEXT_FORMATS = ("auto", "chat", "plain")
_OPERATIONS = {"+": "add", "-": "subtract", "*": "multiply"}
EXAMPLES = 3  # answers kept per task in the JSON
GRID_IMAGES = 16  # generated images in the PNG grid
CHANCE_TRAIN_RECORDS = 2000  # training records whose most frequent answers make the text / mmu chance baselines


# ----------------------------------------------------------------------------------------------------------------------
# Batching


def padded_batches(n: int, size: int) -> list[list[int]]:
  """Indices 0..n-1 in batches of exactly `size` (the last one padded by repeating its last index), so that every
  batch runs the same compiled program; callers drop the repeats."""
  out = []
  for start in range(0, n, size):
    idx = list(range(start, min(n, start + size)))
    out.append(idx + [idx[-1]] * (size - len(idx)))
  return out


def _answers(sampler, prompts: Sequence[Sequence[int]], settings, batch_size: int, key) -> list[str]:
  """Answers for prompts of any lengths: all left-padded to the longest, fixed batch size (one compiled program)."""
  width, out = max(len(p) for p in prompts), []
  for i, idx in enumerate(padded_batches(len(prompts), batch_size)):
    answers = sampler.generate_text([prompts[j] for j in idx], settings, jax.random.fold_in(key, i), width=width,
                                    force_mask=True)
    out += [sampler.answer(a) for a in answers[:len(set(idx))]]
  return out


def _summary(correct: Sequence[bool], kinds: Sequence[str], answers: Sequence[str], refs: Sequence[str],
             prompts: Sequence[str]) -> dict:
  """{accuracy, count, by_kind: {kind: {accuracy, count}}, examples: the first EXAMPLES records}."""
  by_kind = defaultdict(list)
  for ok, kind in zip(correct, kinds):
    by_kind[kind].append(ok)
  return {"accuracy": float(np.mean(correct)) if len(correct) else 0.0, "count": len(correct),
          "by_kind": {k: {"accuracy": float(np.mean(v)), "count": len(v)} for k, v in sorted(by_kind.items())},
          "examples": [{"prompt": p, "reference": r, "answer": a, "correct": bool(c)}
                       for p, r, a, c in list(zip(prompts, refs, answers, correct))[:EXAMPLES]]}


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


def text_format(config, requested: str = "auto") -> str:
  """The prompt format of the text task: `requested`, or for "auto" the one the config's lm data trains."""
  if requested != "auto":
    return requested
  return "chat" if any(str(s) == "toyworld:chat" for s in config.data.lm_sources) else "plain"


def mmu_cot(config) -> bool:
  """Whether the config's mmu data trains CoT answers (then the question carries the CoT instruction)."""
  return any(str(s) == "toyworld:cot" for s in config.data.mmu_sources)


def plain_prefix(record: dict) -> str:
  """`There is <caption>. <a> plus <b> is` — the pre-training sentence `lm_text` cut before its result."""
  text = record["lm_text"]
  return text[:text.rindex(" is ") + len(" is")]


def reasoning_settings(config, text_s):
  """The sampler settings of the text-reasoning task: `text_s` with `sampling.eval_text`'s non-zero values."""
  e = config.sampling.eval_text
  return dataclasses.replace(text_s, **{k: int(e[k]) for k in ("gen_length", "block_length", "steps") if int(e[k])})


def text_prompt(sampler, record: dict, fmt: str = "chat") -> tuple[list[int], str]:
  """(prompt ids, the text shown for them) of a record's word problem: the chat format with the CoT instruction, or
  BOS + the pre-training sentence cut before its result (`plain`)."""
  if fmt == "chat":
    return sampler.chat_prompt(record["problem"], think=True), record["problem"]
  text = plain_prefix(record)
  return [sampler.vocab.bos_id] + sampler.tokenizer.encode(text), text


def eval_text(sampler, records: Sequence[dict], settings, batch_size: int, key, fmt: str = "chat") -> dict:
  """Arithmetic word problems: accuracy (and `format`, the `<think>` rate, in the chat format)."""
  pairs = [text_prompt(sampler, r, fmt) for r in records]
  prompts, shown = [p for p, _ in pairs], [t for _, t in pairs]
  answers = _answers(sampler, prompts, settings, batch_size, key)
  refs = [r["problem_answer"] for r in records]
  correct = [checkers.check_answer(a, ref) for a, ref in zip(answers, refs)]
  out = _summary(correct, [_operation(r) for r in records], answers, refs, shown)
  if fmt == "chat":
    v = sampler.vocab
    out["format"] = float(np.mean([v.think_open in a and v.think_close in a.split(v.think_open, 1)[1]
                                   for a in answers]))
  out["text_format"] = fmt
  return out


def encode_images(sampler, images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """uint8 images [H, W, 3] -> codes [n, N], in fixed-size batches."""
  codes = []
  for idx in padded_batches(len(images), batch_size):
    codes.append(sampler.images.encode([images[j] for j in idx])[:len(set(idx))])
  return np.concatenate(codes)


def eval_mmu(sampler, records: Sequence[dict], settings, batch_size: int, key, cot: bool = False) -> dict:
  """Visual questions about the rendered test images."""
  codes = encode_images(sampler, [r["image"] for r in records], batch_size)
  prompts = [sampler.mmu_prompt(c, r["question"], think=cot) for c, r in zip(codes, records)]
  answers = _answers(sampler, prompts, settings, batch_size, key)
  refs = [r["answer"] for r in records]
  correct = [checkers.check_answer(a, ref) for a, ref in zip(answers, refs)]
  out = _summary(correct, [r["question_kind"] for r in records], answers, refs, [r["question"] for r in records])
  out["cot"] = cot
  return out


def eval_t2i(sampler, records: Sequence[dict], settings, batch_size: int, key,
             clip: Callable | None = None) -> tuple[dict, np.ndarray]:
  """Drawing prompts -> images checked by the pixel checker; returns (summary, the first GRID_IMAGES images).

  `clip` (an `rl.rewards.ClipScore`): also the mean CLIP score of image vs prompt, ×100 as usually reported."""
  prompts = [r["draw_prompt"] for r in records]
  correct, kept, clip_scores, attributes = [], [], [], []
  for i, idx in enumerate(padded_batches(len(records), batch_size)):
    _, images = sampler.generate_images([prompts[j] for j in idx], settings, jax.random.fold_in(key, i))
    unique = idx[:len(set(idx))]
    for j, image in zip(unique, images):
      correct.append(bool(checkers.check_draw(image, records[j])))
      attributes.append(checkers.draw_attribute_scores(image, records[j]))
      if len(kept) < GRID_IMAGES:
        kept.append(image)
    if clip is not None:
      clip_scores += list(clip([{"image": image, "prompt": prompts[j]} for j, image in zip(unique, images)]))
  kinds = [r["draw_kind"] for r in records]
  out = _summary(correct, kinds, ["<image>"] * len(records), prompts, prompts)
  out["attributes"] = _attribute_means(attributes)
  for kind, sub in out["by_kind"].items():
    sub["attributes"] = _attribute_means([a for a, k in zip(attributes, kinds) if k == kind])
  if clip is not None:
    out["clip_score"] = 100.0 * float(np.mean(clip_scores))
  for e in out["examples"]:
    del e["answer"], e["reference"]
  return out, np.stack(kept)


def _attribute_means(scores: Sequence[dict[str, float]]) -> dict[str, float]:
  """Mean of each `draw_attribute_scores` attribute over the images that score it (position: "describe" prompts only),
  and `mean`: the mean over images of their attribute average (the `t2i_attributes` reward)."""
  names = sorted({n for s in scores for n in s})
  out = {n: float(np.mean([s[n] for s in scores if n in s])) for n in names}
  out["mean"] = float(np.mean([np.mean(list(s.values())) for s in scores])) if scores else 0.0
  return out


# ----------------------------------------------------------------------------------------------------------------------
# The whole evaluation


def _operation(record: dict) -> str:
  return _OPERATIONS[re.search(r"[-+*]", record["problem_reasoning"]).group()]


@functools.lru_cache(maxsize=4)
def _training_sample(world) -> tuple[dict, ...]:
  """The first CHANCE_TRAIN_RECORDS training records without images (shared by the text and mmu baselines)."""
  return tuple(world.example("train", i, render_image=False) for i in range(CHANCE_TRAIN_RECORDS))


def chance_baseline(world, task: str, records: Sequence[dict], others: int) -> dict:
  """The accuracy of answers that ignore the input, on the same records — what "above chance" is measured against:
  text  the most frequent answer of the first CHANCE_TRAIN_RECORDS training problems with the same operation;
  mmu   the most frequent training answer of the same question kind;
  t2i   the true image of another test record (records `others`, `others + 1`, ...), checked against this prompt."""
  if task == "t2i":
    ok = [checkers.check_draw(world.example("test", others + i)["image"], r) for i, r in enumerate(records)]
    return {"accuracy": float(np.mean(ok)) if ok else 0.0, "method": "the true image of another test record"}
  train = _training_sample(world)
  kind, answer = (_operation, "problem_answer") if task == "text" else (lambda r: r["question_kind"], "answer")
  counts: dict[str, Counter] = defaultdict(Counter)
  for r in train:
    counts[kind(r)][r[answer]] += 1
  ok = [kind(r) in counts and checkers.check_answer(counts[kind(r)].most_common(1)[0][0], r[answer]) for r in records]
  what = "operation" if task == "text" else "question kind"
  return {"accuracy": float(np.mean(ok)) if ok else 0.0, "method": f"the most frequent training answer per {what}"}


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  tasks: tuple[str, ...] = TASKS
  count: int = 200
  start: int = 0
  batch_size: int = 16
  seed: int = 0
  text_format: str = "auto"
  clip: Callable | None = None  # an rl.rewards.ClipScore: CLIP score of the t2i images (`--clip DIR`)
  chance: bool = True  # also the chance baseline of each task (`chance_baseline`)


def evaluate(sampler, options: EvalOptions, log: Callable[[str], None] = print) -> tuple[dict, np.ndarray | None]:
  """Runs the tasks on the test records; returns (result dict, grid images of t2i or None)."""
  config = sampler.config
  world = tw.ToyWorld.from_config(config)
  records = [world.example("test", options.start + i) for i in range(options.count)]
  text_s = presets.text_settings(config)
  key, batch = jax.random.key(options.seed), max(1, min(options.batch_size, options.count))
  result = {"tasks": {}, "count": options.count, "start": options.start, "split": "test",
            "checkpoint": sampler.origin, "config": config.name, "settings": {}}
  grid = None
  for k, task in enumerate(options.tasks):
    t0 = time.perf_counter()
    task_key = jax.random.fold_in(key, k)
    if task == "text":
      settings = reasoning_settings(config, text_s)
      res = eval_text(sampler, records, settings, batch, task_key, text_format(config, options.text_format))
    elif task == "mmu":
      settings = text_s
      res = eval_mmu(sampler, records, settings, batch, task_key, cot=mmu_cot(config))
    else:
      image_s = presets.image_settings(config)
      res, grid = eval_t2i(sampler, records, image_s, batch, task_key, clip=options.clip)
      result["settings"]["image"] = dataclasses.asdict(image_s)
    if task in ("text", "mmu"):
      result["settings"][task] = dataclasses.asdict(settings)
    res["seconds"] = time.perf_counter() - t0
    if options.chance:
      res["chance"] = chance_baseline(world, task, records, options.start + options.count)
    result["tasks"][task] = res
    chance = f", chance {res['chance']['accuracy']:.3f}" if "chance" in res else ""
    log(f"{task}: accuracy {res['accuracy']:.3f} on {res['count']} records{chance} ({res['seconds']:.1f} s)")
  result["accuracy"] = {t: r["accuracy"] for t, r in result["tasks"].items()}
  return result, grid


def format_table(result: dict) -> str:
  """Markdown table: one row per task and per kind inside it."""
  rows = ["| task | kind | accuracy | records |", "| --- | --- | ---: | ---: |"]
  for task, res in result["tasks"].items():
    rows.append(f"| {task} | all | {res['accuracy']:.3f} | {res['count']} |")
    for kind, sub in res["by_kind"].items():
      rows.append(f"| {task} | {kind} | {sub['accuracy']:.3f} | {sub['count']} |")
    if "attributes" in res:
      parts = ", ".join(f"{n} {v:.3f}" for n, v in res["attributes"].items() if n != "mean")
      rows.append(f"| {task} | attribute score ({parts}) | {res['attributes']['mean']:.3f} | {res['count']} |")
    if "format" in res:
      rows.append(f"| {task} | `<think>` format | {res['format']:.3f} | {res['count']} |")
    if "clip_score" in res:
      rows.append(f"| {task} | CLIP score (×100) | {res['clip_score']:.2f} | {res['count']} |")
    if "chance" in res:
      rows.append(f"| {task} | chance: {res['chance']['method']} | {res['chance']['accuracy']:.3f} | {res['count']} |")
  return "\n".join(rows)


def write_outputs(result: dict, grid: np.ndarray | None, paths: dict[str, str], title: str) -> list[str]:
  """Writes the result JSON, the markdown table under `title` and (when there are t2i images) the PNG grid to
  `paths["json"]`, `paths["md"]`, `paths["png"]`; returns the paths written."""
  os.makedirs(os.path.dirname(os.path.abspath(paths["json"])), exist_ok=True)
  with open(paths["json"], "w") as f:
    json.dump(result, f, indent=1)
  with open(paths["md"], "w") as f:
    f.write(f"# {title}\n\n{format_table(result)}\n")
  written = [paths["json"], paths["md"]]
  if grid is not None:
    written.append(image_io.save_grid(grid, paths["png"], nrow=8))
  return written
