"""grain pipelines: per-task MapDataset chains and the official per-step batch composition (t2i / lm / mmu).

One chain per source (jax-anchors.md §3.5, §11):

  MapDataset.source(src) -> shuffle(seed) -> repeat() -> random_map(example -> layout) -> [host::hosts]
    -> to_iter_dataset() -> SkipBad (drops and counts bad records) -> batch(rows per host)

Shuffle, repeat and the per-example randomness (condition dropout, text windows) are indexed by the *global* record
position, so the data a host sees is a pure function of (seed, process index, process count), and the hosts see
disjoint records. A task with several sources draws, at every step, the source of its whole batch with probability
proportional to its weight (the stage-2.2 mixtures of mmada-official.md §4.6 choose per step, not per example).

`MixedBatchIterator` yields `{"t2i": {...}, "lm": {...}, "mmu": {...}}` of `[rows, L]` int32 arrays (the layouts of
`tokens/prompting.py`); its `get_state()` is a JSON-able dict, and `set_state()` on a fresh iterator resumes with
exactly the next batch. `statistics()` reports records used, skipped (by reason) and converted per source.

Images are encoded online by the `image_encoder` given to `build_iterator` (small jobs), or ahead of training by
`mmada-jax prepare` (`data/prepare.py`, DESIGN.md Decision 8): a `tokens:DIR` source reads its shards of MAGVIT codes
and text ids, checks that they were made with the config's tokenizers, and builds the same layouts without encoding.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Sequence

import grain
import jax
import numpy as np

from mmada_jax import config as config_lib
from mmada_jax.data import prepared, records, sources as src_lib, toyworld as tw
from mmada_jax.data.records import Bad, Context, ImageEncoder
from mmada_jax.tokens import prompting, text_tokenizer as tt

TASKS = ("t2i", "lm", "mmu")
TOYWORLD_VARIANTS = {"t2i": ("draw",), "lm": ("text", "chat"), "mmu": ("qa", "cot")}


# ----------------------------------------------------------------------------------------------------------------------
# Example -> layout


def _image_codes(ex: dict, ctx: Context, notes: list[str]) -> np.ndarray:
  if ex.get("codes") is not None:
    codes = ex["codes"]
  else:
    if ctx.image_encoder is None:
      raise ValueError(f"{ctx.task} source '{ctx.kind}' yields pixels and no image_encoder was given: pass one "
                       f"(MAGVIT-v2 encode), prepare the source with `mmada-jax prepare` and read it as 'tokens:DIR', "
                       f"or use records with 'image_codes' (DESIGN.md Decision 8)")
    codes = ctx.image_encoder(src_lib.decode_image(ex["image"], ex["id"], ctx.resolution, notes))
  return check_image_codes(codes, ex["id"], ctx)


def check_image_codes(codes: Any, record_id: str, ctx: Context) -> np.ndarray:
  """`[N]` int64 codes, or BadRecordError when the count or a value does not fit the config's vocab."""
  n = ctx.prompter.num_image_tokens
  codes = np.asarray(codes).astype(np.int64).reshape(-1)
  if codes.shape != (n,) or codes.min() < 0 or codes.max() >= ctx.prompter.vocab.codebook_size:
    raise src_lib.BadRecordError(record_id, "bad image codes",
                                 f"expected {n} codes in [0, {ctx.prompter.vocab.codebook_size}), got shape "
                                 f"{codes.shape}")
  return codes


def _text_ids(ex: dict, ctx: Context) -> list[int]:
  """The token ids of an example's text: pre-computed ones (`tokens:` sources) or the tokenizer's."""
  if ex.get("text_ids") is not None:
    return np.asarray(ex["text_ids"], np.int64).reshape(-1).tolist()
  return ctx.tokenizer.encode(ex["text"])


def image_example(raw: dict, ctx: Context, notes: list[str]) -> dict[str, Any]:
  """The per-epoch-independent part of an image-task record, what `mmada-jax prepare` stores (raises BadRecordError).

  Returns:
    `{"id", "text", "text_ids": list[int]}` plus `"codes"` `[N]` (records that carry codes) or `"image"` uint8
    `[resolution, resolution, 3]` (decoded and cropped exactly as the online encoder receives it).
  """
  if ctx.task not in ("t2i", "mmu"):
    raise ValueError(f"image_example: task {ctx.task!r} has no images (t2i or mmu)")
  ex = records.to_example(raw, ctx)
  out = {"id": ex["id"], "text": ex["text"], "text_ids": _text_ids(ex, ctx)}
  if ex.get("codes") is not None:
    out["codes"] = check_image_codes(ex["codes"], ex["id"], ctx)
  else:
    out["image"] = src_lib.decode_image(ex["image"], ex["id"], ctx.resolution, notes)
  return out


def _text_window(text: str, ctx: Context, rng: np.random.Generator) -> str:
  """Pre-training text as the official RefinedWeb loader cuts it: newlines removed, a random window (§4.6)."""
  text = text.replace("\n", "")
  limit = ctx.lm_max_chars
  if limit and len(text) > limit:
    start = int(rng.integers(0, len(text) - limit))
    text = text[start:start + limit]
  return text


def _check_answer_fits(ids: list[int], record_id: str, ctx: Context, notes: list[str]) -> None:
  """The mmu text `[BOS] ids [EOS]` is cut to S = data.max_text_len positions (as officially). A record whose answer
  (the ids after the last `<|end_header_id|>`) loses every token is bad: it would teach the model to continue the
  prompt. One that loses only some is kept and counted as `answer_truncated`."""
  p = ctx.prompter
  hits = np.flatnonzero(np.asarray(ids) == p.vocab.end_header_id)
  if not hits.size:
    return
  answer_start = int(hits[-1]) + 2  # in `[BOS] ids` the header sits at its index + 1, the answer starts after it
  kept = p.max_text_len - 1  # positions left before the closing EOS
  if answer_start >= kept:
    raise src_lib.BadRecordError(record_id, "answer cut off", f"the prompt alone takes {answer_start} of the "
                                 f"{p.max_text_len} text positions (data.max_text_len): raise data.max_text_len")
  if len(ids) + 1 > kept:
    notes.append("answer_truncated")


def _layout(ex: dict, ctx: Context, rng: np.random.Generator, notes: list[str]) -> dict[str, np.ndarray]:
  p = ctx.prompter
  if ctx.task == "lm":
    text = _text_window(ex["text"], ctx, rng) if ex.get("plain") else ex["text"]
    ids = ctx.tokenizer.encode(text)
    length = ctx.lm_seq_len
    if not ex.get("plain") and len(ids) + 2 > length:  # official chat loaders drop over-long conversations
      raise src_lib.BadRecordError(ex["id"], "too long", f"{len(ids)} tokens > {length - 2} (lm rows of {length})")
    return p.lm_chat(ids, length)
  ids = _text_ids(ex, ctx)
  codes = _image_codes(ex, ctx, notes)
  if ctx.task == "mmu":
    _check_answer_fits(ids, ex["id"], ctx, notes)
    return p.mmu(codes, ids)
  if ctx.drop_long_captions and len(ids) > p.max_text_len:
    raise src_lib.BadRecordError(ex["id"], "too long", f"caption of {len(ids)} tokens > S={p.max_text_len}")
  return p.t2i(ids, codes, drop_condition=prompting.draw_cond_dropout(rng, ctx.cond_dropout_prob))


def transform(raw: dict, rng: np.random.Generator, ctx: Context) -> dict | Bad:
  """Raw record -> layout dict (plus `_id`, `_notes`), or `Bad` (strict mode: raises BadRecordError)."""
  notes: list[str] = []
  try:
    ex = records.to_example(raw, ctx)
    out = _layout(ex, ctx, rng, notes)
  except src_lib.BadRecordError as e:
    if ctx.strict:
      raise
    return Bad(e.record_id, e.reason)
  out["_notes"] = notes
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Skipping bad records, with counters that live in the iterator state


class SkipBadIterDataset(grain.IterDataset):
  """Drops `Bad` elements, counting them by reason; raises when `limit` consecutive records are all bad."""

  def __init__(self, parent: grain.IterDataset, name: str, limit: int):
    super().__init__(parent)
    self.name, self.limit = name, limit

  def __iter__(self) -> "_SkipBadIterator":
    return _SkipBadIterator(self._parent.__iter__(), self.name, self.limit)


class _SkipBadIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, name: str, limit: int):
    super().__init__(parent)
    self.name, self.limit = name, limit
    self.counts: Counter = Counter()

  def __next__(self) -> dict[str, np.ndarray]:
    for _ in range(self.limit):
      element = next(self._parent)
      if isinstance(element, Bad):
        self.counts[f"skipped/{element.reason}"] += 1
        continue
      for note in element.pop("_notes", ()):
        self.counts[note] += 1
      self.counts["records"] += 1
      return element
    raise src_lib.EmptyDataError(f"source {self.name}: {self.limit} consecutive records were all bad "
                                 f"({dict(self.counts)}); nothing usable")

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.counts = Counter(state["counts"])


# ----------------------------------------------------------------------------------------------------------------------
# Sources from specs, per-source chains, mixtures


def open_source(spec: str, task: str, config, split: str = "train"):
  """(source, kind, variant) for a spec string such as "toyworld:chat" or "jsonl:/data/*.jsonl" (see sources.py)."""
  kind, _, arg = spec.partition(":")
  if kind == "toyworld":
    variant = arg or TOYWORLD_VARIANTS[task][0]
    if variant not in TOYWORLD_VARIANTS[task]:
      raise ValueError(f"source {spec!r}: ToyWorld variant for {task} must be one of {TOYWORLD_VARIANTS[task]}")
    count = int(config.data.toyworld[f"num_{split}"])
    return tw.ToyWorldSource(tw.ToyWorld.from_config(config), split, count), kind, variant
  if not arg:
    raise ValueError(f"source spec {spec!r} needs an argument after '{kind}:'")
  if kind == "tfds":
    name, _, rest = arg.partition(":")
    tsplit, _, labels = rest.partition(":")
    return src_lib.TfdsSource(name, tsplit or split, config.data.data_dir or None, labels or None), kind, ""
  if kind in ("jsonl", "gsm8k"):
    return src_lib.JsonlSource(arg), kind, ""
  if kind == "parquet":
    return src_lib.ParquetSource(arg, strict=bool(config.data.strict)), kind, ""
  if kind == "images":
    return src_lib.ImageFolderSource(arg), kind, ""
  if kind == "wds":
    return src_lib.WebDatasetSource(arg, strict=bool(config.data.strict)), kind, ""
  if kind == "llava":
    path, _, root = arg.partition(":")
    return src_lib.LlavaSource(path, root or None), kind, ""
  if kind == "tokens":
    return src_lib.TokenShardSource(arg), kind, ""
  raise ValueError(f"unknown source kind {kind!r} in {spec!r}; expected toyworld, tfds, jsonl, gsm8k, parquet, "
                   f"images, wds, llava or tokens")


def source_dataset(source, ctx: Context, *, name: str, seed: int, batch_size: int, process_index: int,
                   process_count: int, shuffle: bool, read_options: grain.ReadOptions | None) -> grain.IterDataset:
  """The chain of one source: batches `{key: [batch_size, L]}` of this host's share of the records."""
  if len(source) == 0:
    raise src_lib.EmptyDataError(f"source {name} has no records")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  # Per-record randomness is seeded by the global position, before host slicing (identical whatever the host count).
  ds = ds.random_map(functools.partial(transform, ctx=ctx), seed=seed)
  ds = ds[process_index::process_count]
  it = SkipBadIterDataset(ds.to_iter_dataset(read_options), name, limit=len(source) // process_count + 1)
  return it.batch(batch_size, drop_remainder=True, batch_fn=prompting.stack)


def _find_counts(state: Any) -> dict:
  """The SkipBad counters inside a (nested) grain iterator state."""
  if isinstance(state, dict):
    if "counts" in state and "parent" in state:
      return state["counts"]
    for value in state.values():
      found = _find_counts(value)
      if found is not None:
        return found
  return None


class TaskIterator:
  """Batches of one task; with several sources, each step's batch comes from one source drawn by weight."""

  def __init__(self, task: str, names: Sequence[str], datasets: Sequence[grain.IterDataset], weights: Sequence[float],
               seed: int):
    if len(names) != len(weights) or not names:
      raise ValueError(f"data.{task}_sources and data.{task}_weights must be non-empty and of equal length")
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
      raise ValueError(f"data.{task}_weights must be >= 0 with a positive sum, got {tuple(weights)}")
    self.task, self.names, self.probs, self.seed = task, list(names), w / w.sum(), seed
    self.iters = [iter(d) for d in datasets]
    self.step = 0

  def __next__(self) -> dict[str, np.ndarray]:
    k = 0
    if len(self.iters) > 1:
      k = int(np.random.default_rng([self.seed, TASKS.index(self.task), self.step]).choice(len(self.iters),
                                                                                         p=self.probs))
    batch = next(self.iters[k])
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step, "sources": {n: it.get_state() for n, it in zip(self.names, self.iters)}}

  def set_state(self, state: dict) -> None:
    if sorted(state["sources"]) != sorted(self.names):
      raise ValueError(f"data state of task {self.task} has sources {sorted(state['sources'])}, the config has "
                       f"{sorted(self.names)}")
    self.step = int(state["step"])
    for n, it in zip(self.names, self.iters):
      it.set_state(state["sources"][n])

  def statistics(self) -> dict[str, dict]:
    return {n: dict(_find_counts(it.get_state()) or {}) for n, it in zip(self.names, self.iters)}


class MixedBatchIterator:
  """Yields `{"t2i": batch, "lm": batch, "mmu": batch}` (tasks with zero rows are left out) — the official step."""

  def __init__(self, tasks: dict[str, TaskIterator]):
    self.tasks = tasks

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    return {t: next(it) for t, it in self.tasks.items()}

  def get_state(self) -> dict:
    """JSON-serialisable position (and skip counters) of every source."""
    return {t: it.get_state() for t, it in self.tasks.items()}

  def set_state(self, state: dict) -> None:
    if sorted(state) != sorted(self.tasks):
      raise ValueError(f"data state has tasks {sorted(state)}, this pipeline has {sorted(self.tasks)}")
    for t, it in self.tasks.items():
      it.set_state(state[t])

  def statistics(self) -> dict[str, dict[str, dict]]:
    """`{task: {source: {"records": n, "skipped/<reason>": n, "converted/<what>": n}}}` on this host."""
    return {t: it.statistics() for t, it in self.tasks.items()}


def _source_seed(seed: int, task: str, k: int) -> int:
  return int(np.random.SeedSequence([seed, TASKS.index(task), k]).generate_state(1)[0])


def make_context(config, task: str, kind: str, variant: str, tokenizer: tt.TextTokenizer,
                 image_encoder: ImageEncoder | None) -> Context:
  d = config.data
  return Context(task=task, kind=kind, variant=variant, prompter=prompting.Prompter.from_config(config),
                 tokenizer=tokenizer, image_encoder=image_encoder, resolution=int(config.magvit.resolution),
                 cond_dropout_prob=float(d.cond_dropout_prob), mmu_literal_eot=bool(d.mmu_literal_eot),
                 lm_max_chars=int(d.lm_max_chars), lm_seq_len=config_lib.row_lengths(config)["lm"],
                 drop_long_captions=bool(d.drop_long_captions),
                 strict=bool(d.strict))


def build_iterator(config, tokenizer: tt.TextTokenizer, image_encoder: ImageEncoder | None = None,
                   split: str = "train", process_index: int | None = None, process_count: int | None = None,
                   read_options: grain.ReadOptions | None = None) -> MixedBatchIterator:
  """The training data of a config: per step `data.batch_size_<task> / process_count` rows of each task on this host.

  Args:
    tokenizer: the text tokenizer (its vocab must be the config's).
    image_encoder: `[H, W, 3]` uint8 -> `[N]` codes, for sources that yield pixels (ToyWorld, image files); records
      with `image_codes` and `tokens:DIR` sources (checked against the config and `tokenizer`) need none.
    process_index, process_count: this host and the number of hosts (default: from JAX).
    read_options: grain read threads / prefetch (default: `data.read_threads`, `data.prefetch_buffer`).
  """
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  d = config.data
  if tokenizer.vocab != prompting.Prompter.from_config(config).vocab:
    raise ValueError("the tokenizer was built for another vocabulary than config.vocab")
  read_options = read_options or grain.ReadOptions(num_threads=int(d.read_threads),
                                                   prefetch_buffer_size=int(d.prefetch_buffer))
  tasks = {}
  for task in TASKS:
    rows = int(d[f"batch_size_{task}"])
    if rows == 0:
      continue
    if rows % process_count:
      raise ValueError(f"data.batch_size_{task}={rows} is not divisible by the {process_count} hosts")
    names, datasets = [], []
    for k, spec in enumerate(d[f"{task}_sources"]):
      source, kind, variant = open_source(spec, task, config, split)
      if kind == "tokens":
        prepared.check_prepared(source.manifest, config, task, tokenizer, where=f"data.{task}_sources {spec!r}")
      ctx = make_context(config, task, kind, variant, tokenizer, image_encoder)
      names.append(f"{k}:{spec}")
      datasets.append(source_dataset(source, ctx, name=f"{task}/{spec}", seed=_source_seed(config.seed, task, k),
                                     batch_size=rows // process_count, process_index=process_index,
                                     process_count=process_count, shuffle=bool(d.shuffle), read_options=read_options))
    tasks[task] = TaskIterator(task, names, datasets, d[f"{task}_weights"], int(config.seed))
  if not tasks:
    raise ValueError("every data.batch_size_<task> is 0: nothing to train on")
  return MixedBatchIterator(tasks)
