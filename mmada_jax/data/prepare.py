"""`mmada-jax prepare`: an image(+text) source -> ArrayRecord shards of token ids (DESIGN.md Decision 8).

  mmada-jax prepare --config FILE[:variant] --source SPEC --task t2i|mmu --out DIR [--split train]
                    [--shard_size 4096] [--batch_size 64] [--magvit CKPT] [--limit N] [--no_progress]
                    [--config.key=value ...]

Every record of SPEC (any kind `pipelines.open_source` reads: toyworld, tfds, jsonl, parquet, images, wds, llava) goes
through the training pipeline's own per-record code (`pipelines.image_example`: the task's text, tokenised with the
config's text tokenizer; the image decoded and cropped to `magvit.resolution`); the images are then encoded in
fixed-size jitted batches by the MAGVIT-v2 checkpoint (`--magvit`, default `data.image_tokenizer`). The training
pipeline reads DIR as the source `tokens:DIR` and builds the same layouts as with online encoding (condition dropout
and the other per-epoch randomness stay in the pipeline), without running the encoder.

DIR layout:
  tokens-00000-of-00012.array_record   shard k holds the good records among source indices [k*shard_size,
                                       (k+1)*shard_size), in index order (ArrayRecord, `group_size:1` for random access)
  manifest.json                        identity, per-shard counts, skipped records and why, totals
  .lock                                held while a prepare runs (a second one into DIR is refused)
A record is a msgpack map (flax.serialization; arrays keep dtype and shape): `id` (the source's record id), `index`
(position in the source), `text` (the task text: caption, or the mmu prompt and answer), `text_ids` int32 [T] (that text
tokenised, no BOS/EOS/padding) and `image_codes` [N] (uint16, or int32 for codebooks over 65,536 codes).

Resuming: a shard is written to `<name>.tmp` and published under its final name (a hard link that cannot replace an
existing file, then the temporary name is removed) only when complete, after its manifest entry; a rerun keeps every
published shard and redoes the others, so an interrupted run and its rerun leave the same bytes as one uninterrupted
run. A finished shard is never overwritten. A rerun whose identity (task, source, split, record count, shard size,
limit, MAGVIT parameter hash and architecture, text tokenizer hash, vocab, text-layout facts) differs from the
manifest's is refused with the differing entries named. `complete` becomes true after the last shard.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
from collections import Counter
from typing import Any, Callable

import grain
import numpy as np
from array_record.python import array_record_module

from mmada_jax.data import pipelines, prepared, sources as src_lib
from mmada_jax.data.tokenizer import shared_tokenizer
from mmada_jax.inference.image_tokenizer import load_image_tokenizer
from mmada_jax.train import metrics_io

FORMAT_VERSION = 1
TASKS = ("t2i", "mmu")
SHARD_NAME = "tokens-{:05d}-of-{:05d}.array_record"
ARRAY_RECORD_OPTIONS = "group_size:1"


# ----------------------------------------------------------------------------------------------------------------------
# The job


class _Job:
  """Everything one `prepare` run needs: the source, the per-record context, the encoder, the directory."""

  def __init__(self, config, spec: str, task: str, out: str, *, split: str, shard_size: int, batch_size: int,
               limit: int, magvit: str | None, tokenizer, log: Callable[[str], None]):
    if task not in TASKS:
      raise ValueError(f"--task {task!r}: prepare stores image tasks {TASKS} (lm text is cut into random windows at "
                       f"training time; read it directly)")
    if shard_size < 1 or batch_size < 1 or limit < 0:
      raise ValueError(f"--shard_size ({shard_size}) and --batch_size ({batch_size}) must be >= 1, --limit ({limit}) "
                       f">= 0")
    if spec.partition(":")[0] == "tokens":
      raise ValueError(f"--source {spec!r} is already prepared")
    self.config, self.spec, self.task, self.split, self.log = config, spec, task, split, log
    self.out, self.shard_size, self.batch_size, self.limit = os.path.abspath(out), shard_size, batch_size, limit
    self.source, kind, variant = pipelines.open_source(spec, task, config, split)
    self.count = min(len(self.source), limit) if limit else len(self.source)
    if self.count == 0:
      raise src_lib.EmptyDataError(f"source {spec!r} has no records")
    self.num_shards = -(-self.count // shard_size)
    tokenizer = tokenizer or shared_tokenizer(config)
    self.ctx = pipelines.make_context(config, task, kind, variant, tokenizer, None)
    self.image_tokenizer = load_image_tokenizer(config, magvit, log)
    self.magvit_path = os.path.abspath(magvit or config.data.image_tokenizer)
    self.identity = {
        "task": task, "source": prepared.source_identity(spec, variant, split, len(self.source), config),
        "limit": limit, "shard_size": shard_size, "num_shards": self.num_shards, "vocab": prepared.vocab_facts(config),
        "text_tokenizer": prepared.text_tokenizer_identity(tokenizer), "layout": prepared.layout_facts(config, task),
        "image_tokenizer": {"param_sha256": prepared.params_sha256(self.image_tokenizer.params),
                            "magvit": prepared.magvit_arch(config), "codebook_size": int(config.vocab.codebook_size),
                            "num_image_tokens": int(config.vocab.num_image_tokens)},
    }
    codebook = int(config.vocab.codebook_size)
    self.code_dtype = np.uint16 if codebook <= 65536 else np.int32

  def shard_path(self, k: int) -> str:
    return os.path.join(self.out, SHARD_NAME.format(k, self.num_shards))

  def bounds(self, k: int) -> tuple[int, int]:
    return k * self.shard_size, min(self.count, (k + 1) * self.shard_size)

  def info(self) -> dict[str, Any]:
    """Manifest entries that are not compared on a rerun (where things were found, names)."""
    return {"source_spec": self.spec, "image_tokenizer_path": self.magvit_path, "config_name": self.config.get("name"),
            "text_tokenizer_source": self.ctx.tokenizer.source, "record_format": "msgpack (flax.serialization)",
            "array_record_options": ARRAY_RECORD_OPTIONS}

  def encode(self, images: list[np.ndarray]) -> np.ndarray:
    """uint8 images -> codes [len(images), N], always in batches of `batch_size` (one compiled program)."""
    pad = [np.zeros_like(images[0])] * (self.batch_size - len(images))
    return self.image_tokenizer.encode(images + pad)[:len(images)]


def _parts(raw: dict, ctx: pipelines.Context) -> tuple[dict[str, Any], list[str]]:
  """(`pipelines.image_example` of a record, conversion notes), or ({"bad": reason, ...}, notes) for a bad record."""
  notes: list[str] = []
  try:
    return pipelines.image_example(raw, ctx, notes), notes
  except src_lib.BadRecordError as e:
    if ctx.strict:
      raise
    return {"bad": e.reason, "id": e.record_id, "detail": str(e)}, notes


def _shard_records(job: _Job, k: int):
  """(source index, parts, notes) of shard k in index order, decoded by grain threads (`data.read_threads`)."""
  start, stop = job.bounds(k)
  ds = grain.MapDataset.source(job.source)[start:stop].map(functools.partial(_parts, ctx=job.ctx))
  threads = int(job.config.data.read_threads)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * job.batch_size, threads))
  for i, (parts, notes) in enumerate(ds.to_iter_dataset(options)):
    yield start + i, parts, notes


def _write_shard(job: _Job, k: int, path: str, bar) -> dict[str, Any]:
  """Writes shard k to `path`; returns its manifest entry (counts) and its skipped records."""
  start, stop = job.bounds(k)
  entry = {"shard": k, "file": os.path.basename(job.shard_path(k)), "first": start, "stop": stop, "records": 0}
  skipped, converted, pending = [], Counter(), []  # pending: records waiting for a full batch of images
  writer = array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)

  def flush():
    images = [p["image"] for _, p in pending if "image" in p]
    codes = iter(job.encode(images) if images else ())
    for index, p in pending:
      image_codes = next(codes) if "image" in p else p["codes"]
      writer.write(src_lib.encode_token_record({
          "id": str(p["id"]), "index": index, "text": p["text"], "text_ids": np.asarray(p["text_ids"], np.int32),
          "image_codes": np.asarray(image_codes).astype(job.code_dtype)}))
    entry["records"] += len(pending)
    bar.advance(len(pending))
    pending.clear()

  for index, parts, notes in _shard_records(job, k):
    converted.update(notes)
    if "bad" in parts:
      skipped.append({"index": index, "id": parts["id"], "reason": parts["bad"], "detail": parts["detail"], "shard": k})
      bar.advance(1)
      continue
    pending.append((index, parts))
    if "image" in parts and sum("image" in p for _, p in pending) == job.batch_size:
      flush()
  flush()
  writer.close()
  _fsync(path)
  entry["skipped"], entry["converted"] = len(skipped), dict(sorted(converted.items()))
  return {"entry": entry, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------------------
# Files: atomic manifest, no-overwrite publishing, lock


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_manifest(out: str, manifest: dict) -> None:
  """manifest.json replaced atomically (temporary file, fsync, rename)."""
  path = os.path.join(out, src_lib.TOKENS_MANIFEST)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as fh:
    json.dump(manifest, fh, indent=1, sort_keys=True)
    fh.write("\n")
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def _publish(tmp: str, final: str) -> None:
  """Gives a finished shard its final name; never replaces an existing file."""
  try:
    os.link(tmp, final)  # fails with FileExistsError instead of replacing
  except FileExistsError:
    raise src_lib.PreparedDataError(f"{final} appeared while this run wrote it; refusing to overwrite a finished "
                                    f"shard") from None
  except OSError as e:
    if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
      raise
    if os.path.exists(final):  # a file system without hard links: check, then rename
      raise src_lib.PreparedDataError(f"{final} exists; refusing to overwrite a finished shard") from None
    os.rename(tmp, final)
    return
  os.unlink(tmp)


@contextlib.contextmanager
def _locked(out: str):
  with open(os.path.join(out, ".lock"), "w") as fh:
    try:
      fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise src_lib.PreparedDataError(f"{out}: another `mmada-jax prepare` is writing into this directory") from None
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------------
# Resuming


def _start(job: _Job) -> dict[int, dict]:
  """The finished shards of an earlier run into job.out ({k: {"entry", "skipped"}}), after checking its identity."""
  names = set(os.listdir(job.out))
  shards = {n for n in names if n.startswith("tokens-") and n.endswith(".array_record")}
  if src_lib.TOKENS_MANIFEST not in names:
    if shards:
      raise src_lib.PreparedDataError(f"{job.out} holds shard files but no {src_lib.TOKENS_MANIFEST}; refusing to "
                                      f"touch them (choose another --out)")
    return {}
  manifest = src_lib.read_token_manifest(job.out)
  diffs = prepared.diff_identity(manifest.get("identity"), job.identity)
  if diffs:
    raise src_lib.PreparedDataError(
        f"{job.out} was prepared with other settings; refusing to mix shards (choose another --out, or rerun with the "
        f"original ones). Differences (directory vs this run):\n  " + "\n  ".join(diffs))
  done = {}
  for entry in manifest["shards"]:  # an entry whose file is missing was written just before a kill: redo that shard
    if entry["file"] in shards:
      k = entry["shard"]
      done[k] = {"entry": entry, "skipped": [s for s in manifest["skipped"] if s["shard"] == k]}
  unknown = shards - {e["entry"]["file"] for e in done.values()}
  if unknown:
    raise src_lib.PreparedDataError(f"{job.out}: shard files not listed in {src_lib.TOKENS_MANIFEST}: "
                                    f"{sorted(unknown)[:3]}; refusing to touch them")
  return done


def _manifest(job: _Job, done: dict[int, dict], complete: bool) -> dict[str, Any]:
  entries = [done[k]["entry"] for k in sorted(done)]
  skipped = [s for k in sorted(done) for s in done[k]["skipped"]]
  converted = Counter()
  for e in entries:
    converted.update(e["converted"])
  return {"format": src_lib.TOKENS_FORMAT, "format_version": FORMAT_VERSION, "identity": job.identity, **job.info(),
          "num_shards": job.num_shards, "shards": entries, "records": sum(e["records"] for e in entries),
          "skipped": skipped, "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
          "converted": dict(sorted(converted.items())), "complete": complete}


def run(job: _Job, progress: bool = True, after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Writes the missing shards of `job` and returns the final manifest. `after_shard(k)` runs after each published
  shard (tests use it to interrupt a run)."""
  os.makedirs(job.out, exist_ok=True)
  with _locked(job.out):
    done = _start(job)
    todo = [k for k in range(job.num_shards) if k not in done]
    finished = sum(job.bounds(k)[1] - job.bounds(k)[0] for k in done)
    job.log(f"prepare: {job.count} records of {job.spec} ({job.task}) -> {job.num_shards} shards in {job.out}"
            + (f"; {len(done)} shards already done" if done else ""))
    with metrics_io.progress(job.count, finished, enabled=progress, unit="rec", primary=True) as bar:
      for k in todo:
        final = job.shard_path(k)
        tmp = final + ".tmp"
        if os.path.exists(tmp):
          os.unlink(tmp)  # left by a killed run: never published, safe to redo
        done[k] = _write_shard(job, k, tmp, bar)
        write_manifest(job.out, _manifest(job, done, complete=False))  # entry first, then the shard's final name
        _publish(tmp, final)
        if after_shard is not None:
          after_shard(k)
    manifest = _manifest(job, done, complete=True)
    write_manifest(job.out, manifest)
  return manifest


def prepare(config, spec: str, task: str, out: str, *, split: str = "train", shard_size: int = 4096,
            batch_size: int = 64, limit: int = 0, magvit: str | None = None, tokenizer=None, progress: bool = True,
            log: Callable[[str], None] = print, after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Library entry point of `mmada-jax prepare` (arguments as the command's); returns the manifest."""
  job = _Job(config, spec, task, out, split=split, shard_size=shard_size, batch_size=batch_size, limit=limit,
             magvit=magvit, tokenizer=tokenizer, log=log)
  return run(job, progress=progress, after_shard=after_shard)
