"""Random-access data sources and record decoding for the grain pipelines.

A source is any object with `__len__` and `__getitem__(index) -> dict` (grain's `RandomAccessDataSource` protocol);
every record carries an `id` that names it in errors and statistics ("file.jsonl:17", "shard-0003.tar:img_042", ...).
Sources only locate raw bytes; decoding (JSON, UTF-8, images) happens in the pipeline's map step through the helpers
below, so that a bad record raises `BadRecordError(record_id, reason)` there and can be skipped and counted
(`pipelines.py`), or reported in strict mode.

Source specs (`config.data.*_sources`), "kind:argument":
  toyworld[:variant]         the built-in generator, no files (variants: see `pipelines.TOYWORLD_VARIANTS`)
  tfds:NAME[:SPLIT[:LABELS]] a prepared tensorflow-datasets data set read with `tfds.data_source` (ArrayRecord), e.g.
                             `tfds:toy_world/<config>` built by `toyworld_tfds.py`, or `tfds:imagenet2012` where the
                             caption is the class name (official stage 1.1). tfds names ImageNet classes by WordNet id;
                             LABELS is a file of `index: description` lines (the official label-mapping format) that
                             gives the readable names the official captions use
  jsonl:GLOB                 JSON lines: text (`text`/`content`), chat (`messages`), image-caption or VQA rows
  parquet:GLOB               Parquet tables, one record per row (official RefinedWeb / chat data use `content`)
  images:DIR                 image files with a caption in a same-named `.txt` file
  wds:GLOB                   webdataset tar shards (members `key.jpg|png|webp` + `key.txt|caption|json`)
  llava:JSON[:IMAGE_ROOT]    LLaVA-style instruction JSON (`image`, `conversations` from human / gpt)
  gsm8k:PATH                 GSM8K-style JSONL (`question`, `answer` ending in `#### <number>`)
  tokens:DIR                 ArrayRecord shards of token ids written by `mmada-jax prepare` (data/prepare.py): each
                             record holds the text ids and MAGVIT-v2 codes of one image-task example, no pixels
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import os
import tarfile
import warnings
from typing import Any, Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import serialization
from PIL import Image

from mmada_jax.models import image_io

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CAPTION_EXTS = (".txt", ".caption", ".json")
TOKENS_FORMAT = "mmada-jax-tokens"  # the manifest of a `tokens:` directory (data/prepare.py)
TOKENS_MANIFEST = "manifest.json"


class BadRecordError(ValueError):
  """A record that cannot be used (unreadable image, empty text, ...); `record_id` names it."""

  def __init__(self, record_id: str, reason: str, detail: str = ""):
    super().__init__(f"bad record {record_id}: {reason}" + (f" ({detail})" if detail else ""))
    self.record_id = record_id
    self.reason = reason


class EmptyDataError(ValueError):
  """A source has no records at all."""


class PreparedDataError(ValueError):
  """A `tokens:` directory is unfinished, damaged, or was prepared with other tokenizers than the config's."""


def expand(pattern: str) -> list[str]:
  """Sorted files matching a glob (or the file itself); an error naming the pattern when nothing matches."""
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise EmptyDataError(f"no file matches {pattern!r}")
  return files


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def _skip_file(path: str, reason: str, detail: str, strict: bool, skipped: list[tuple[str, str]]) -> None:
  """A whole file that cannot be indexed: raise in strict mode, otherwise warn (naming it) and remember it."""
  if strict:
    raise BadRecordError(path, reason, detail)
  warnings.warn(f"skipping {path}: {reason} ({detail})", stacklevel=3)
  skipped.append((path, f"{reason}: {detail}"))


def _require_some(count: int, pattern: str, skipped: list[tuple[str, str]]) -> None:
  if count == 0 and skipped:
    raise EmptyDataError(f"no usable record in {pattern!r}: " + "; ".join(f"{p} ({r})" for p, r in skipped))


class ListSource:
  """Records held in memory (tests, small evaluation sets)."""

  def __init__(self, records: Sequence[dict[str, Any]], name: str = "list"):
    self.records = list(records)
    self.name = name

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.records[index])
    record.setdefault("id", f"{self.name}:{index}")
    return record


class JsonlSource:
  """JSON lines, indexed by byte offset so that any line is one seek away. Records: `{"id", "raw": bytes, "dir"}`."""

  def __init__(self, pattern: str):
    self.files = expand(pattern)
    self.index: list[tuple[int, int, int]] = []  # (file number, byte offset, line number)
    for f, path in enumerate(self.files):
      offset = 0
      with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
          if line.strip():
            self.index.append((f, offset, lineno))
          offset += len(line)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    f, offset, lineno = self.index[index]
    rid = f"{self.files[f]}:{lineno}"
    try:
      with open(self.files[f], "rb") as fh:
        fh.seek(offset)
        raw = fh.readline()
    except OSError as e:  # deleted or unreadable under a running pipeline: a bad record naming the file
      raise BadRecordError(rid, "unreadable file", f"{type(e).__name__}: {e}") from e
    return {"id": rid, "raw": raw, "dir": os.path.dirname(self.files[f])}


class ParquetSource:
  """Rows of Parquet files, read one row group at a time (the last one is cached)."""

  def __init__(self, pattern: str, columns: Sequence[str] | None = None, strict: bool = False):
    self.files = expand(pattern)
    self.columns = list(columns) if columns else None
    self.groups: list[tuple[int, int]] = []  # (file number, row group)
    self.starts: list[int] = []
    self.skipped_files: list[tuple[str, str]] = []  # (path, reason): files that could not be opened
    total = 0
    for f, path in enumerate(self.files):
      try:
        meta = pq.ParquetFile(path).metadata
      except (pa.ArrowException, OSError) as e:  # truncated / not Parquet: its footer cannot be read
        _skip_file(path, "unreadable parquet file", str(e), strict, self.skipped_files)
        continue
      for g in range(meta.num_row_groups):
        self.groups.append((f, g))
        self.starts.append(total)
        total += meta.row_group(g).num_rows
    _require_some(total, pattern, self.skipped_files)
    self.total = total
    self._cache: tuple[int, list[dict]] | None = None

  def __len__(self) -> int:
    return self.total

  def __getitem__(self, index: int) -> dict[str, Any]:
    g = bisect.bisect_right(self.starts, index) - 1
    if self._cache is None or self._cache[0] != g:
      f, group = self.groups[g]
      self._cache = (g, pq.ParquetFile(self.files[f]).read_row_group(group, columns=self.columns).to_pylist())
    row = dict(self._cache[1][index - self.starts[g]])
    row["id"] = f"{self.files[self.groups[g][0]]}:group{self.groups[g][1]}:row{index - self.starts[g]}"
    return row


class ImageFolderSource:
  """`DIR/**/name.{jpg,png,...}` with its caption in `name.txt`. Records: `{"id", "image_path", "caption_path"}`."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise EmptyDataError(f"image folder {root!r} does not exist")
    self.items = []
    for dirpath, _, names in sorted(os.walk(root)):
      for name in sorted(names):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
          self.items.append((os.path.join(dirpath, name), os.path.join(dirpath, stem + ".txt")))

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image, caption = self.items[index]
    return {"id": image, "image_path": image, "caption_path": caption}


class WebDatasetSource:
  """Tar shards in webdataset layout: members sharing a key (`key.jpg`, `key.txt`, ...) form one record.

  The shards are indexed once (member offsets), then each record is read with seeks. Records:
  `{"id": "shard.tar:key", "<ext>": bytes, ...}` with extensions lower-cased and without the dot.
  """

  def __init__(self, pattern: str, strict: bool = False):
    self.files = expand(pattern)
    self.items: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
    self.skipped_files: list[tuple[str, str]] = []  # (path, reason): shards cut short or unreadable
    for f, path in enumerate(self.files):
      groups: dict[str, dict[str, tuple[int, int]]] = {}
      size = os.path.getsize(path)
      try:
        with tarfile.open(path, "r:") as tar:
          for m in tar:
            if not m.isfile():
              continue
            if m.offset_data + m.size > size:
              raise tarfile.ReadError(f"member {m.name!r} is cut short at the end of the file")
            base = os.path.basename(m.name)
            key, _, ext = base.partition(".")
            prefix = os.path.dirname(m.name)
            groups.setdefault(os.path.join(prefix, key), {})[ext.lower()] = (m.offset_data, m.size)
      except tarfile.TarError as e:  # a truncated shard keeps the members indexed before the cut
        _skip_file(path, "truncated or unreadable tar shard", f"{e}; {len(groups)} records before it kept", strict,
                   self.skipped_files)
      self.items += [(f, key, members) for key, members in groups.items()]
    _require_some(len(self.items), pattern, self.skipped_files)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    f, key, members = self.items[index]
    record: dict[str, Any] = {"id": f"{self.files[f]}:{key}"}
    with open(self.files[f], "rb") as fh:
      for ext, (offset, size) in members.items():
        fh.seek(offset)
        record[ext] = fh.read(size)
    return record


class LlavaSource:
  """LLaVA-style instruction data: a JSON list of `{"id", "image", "conversations": [{"from", "value"}, ...]}`."""

  def __init__(self, path: str, image_root: str | None = None):
    if not os.path.isfile(path):
      raise EmptyDataError(f"LLaVA JSON {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
      try:
        self.items = json.load(fh)
      except json.JSONDecodeError as e:
        raise BadRecordError(path, "not valid JSON", str(e)) from e
    if not isinstance(self.items, list):
      raise BadRecordError(path, "expected a JSON list of samples")
    self.image_root = image_root or os.path.dirname(path)
    self.path = path

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> dict[str, Any]:
    item = self.items[index]
    record = {"id": f"{self.path}:{item.get('id', index) if isinstance(item, dict) else index}", "item": item}
    record["dir"] = self.image_root
    return record


class TfdsSource:
  """A prepared tensorflow-datasets data set read through `tfds.data_source` (random access over ArrayRecord)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, label_file: str | None = None):
    # Imported here, the one exception to module-level imports: tensorflow-datasets takes seconds to import and only
    # `tfds:` sources need it (importing toyworld_tfds registers the ToyWorld builder with it).
    import tensorflow_datasets as tfds

    if name.split("/")[0] in ("toy_world", "toyworld"):
      from mmada_jax.data import toyworld_tfds  # noqa: F401
      name = "toy_world" + name[len(name.split("/")[0]):]
    self.name, self.split = name, split
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.label_names = None
    features = getattr(getattr(self.source, "dataset_info", None), "features", None)
    if features is not None and "label" in features and hasattr(features["label"], "names"):
      self.label_names = list(features["label"].names)
    if label_file:
      self.label_names = read_label_file(label_file, len(self.label_names or ()))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self.source[index])
    record.setdefault("id", f"tfds:{self.name}/{self.split}/{index}")
    if isinstance(record["id"], bytes):
      record["id"] = record["id"].decode("utf-8", "replace")
    if self.label_names is not None and "label" in record:
      record["label_name"] = self.label_names[int(record["label"])]
    return record


def read_label_file(path: str, num_classes: int = 0) -> list[str]:
  """Class names from `index: description` lines; every index in [0, max] must appear once."""
  names: dict[int, str] = {}
  with open(path, encoding="utf-8") as fh:
    for lineno, line in enumerate(fh, start=1):
      if not line.strip():
        continue
      index, sep, text = line.partition(":")
      if not sep or not index.strip().isdigit() or int(index) in names:
        raise ValueError(f"{path}:{lineno}: expected a new 'index: description' line, got {line.strip()!r}")
      names[int(index)] = text.strip()
  count = max(num_classes, max(names, default=-1) + 1)
  missing = [i for i in range(count) if i not in names]
  if missing:
    raise ValueError(f"{path}: no description for class indices {missing[:10]}")
  return [names[i] for i in range(count)]


class TokenShardSource:
  """The records of a directory written by `mmada-jax prepare` (see `data/prepare.py` for the format).

  Only a finished preparation is read (the manifest says `complete`); shards without records are left out. Records:
  `{"id", "index", "text", "text_ids": int32 [T], "image_codes": [N]}`. `manifest` is the parsed manifest.json.
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.manifest = read_token_manifest(self.root)
    shards = self.manifest["shards"]
    if not self.manifest.get("complete"):
      raise PreparedDataError(f"{self.root}: the preparation did not finish ({len(shards)} of "
                              f"{self.manifest['num_shards']} shards); rerun the same `mmada-jax prepare` command to "
                              f"complete it")
    files = [os.path.join(self.root, s["file"]) for s in shards if s["records"]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise PreparedDataError(f"{self.root}: shard files listed in {TOKENS_MANIFEST} are missing: {missing[:3]}")
    self.source = grain.sources.ArrayRecordDataSource(files) if files else None
    count = len(self.source) if files else 0
    if count != self.manifest["records"]:
      raise PreparedDataError(f"{self.root}: the shards hold {count} records, {TOKENS_MANIFEST} says "
                              f"{self.manifest['records']}")

  def __len__(self) -> int:
    return self.manifest["records"]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_token_record(self.source[index])

  def __repr__(self) -> str:
    return f"TokenShardSource({self.root}, {len(self)} records)"


def read_token_manifest(root: str) -> dict[str, Any]:
  """The manifest of a prepared directory; PreparedDataError when there is none or it is not ours."""
  path = os.path.join(root, TOKENS_MANIFEST)
  if not os.path.isfile(path):
    raise PreparedDataError(f"{root} is not a directory prepared by `mmada-jax prepare` (no {TOKENS_MANIFEST})")
  try:
    with open(path, encoding="utf-8") as fh:
      manifest = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise PreparedDataError(f"{path}: unreadable manifest ({e})") from e
  if not isinstance(manifest, dict) or manifest.get("format") != TOKENS_FORMAT:
    raise PreparedDataError(f"{path}: not a {TOKENS_FORMAT} manifest")
  return manifest


def encode_token_record(record: dict[str, Any]) -> bytes:
  """One prepared record -> bytes: a msgpack map (flax.serialization; arrays keep dtype and shape)."""
  return serialization.msgpack_serialize(record)


def decode_token_record(data: bytes) -> dict[str, Any]:
  return serialization.msgpack_restore(data)


# ----------------------------------------------------------------------------------------------------------------------
# Decoding helpers (raise BadRecordError)


def decode_text(value: Any, record_id: str, field: str = "text") -> str:
  """UTF-8 text of a str/bytes value; empty or whitespace-only text and invalid UTF-8 are bad records."""
  if isinstance(value, (bytes, np.bytes_)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecordError(record_id, "non-utf8 text", f"{field}: {e}") from e
  if not isinstance(value, str):
    raise BadRecordError(record_id, "missing text", f"{field} is {type(value).__name__}")
  if not value.strip():
    raise BadRecordError(record_id, "empty text", field)
  return value


def parse_json(raw: bytes, record_id: str) -> dict[str, Any]:
  text = decode_text(raw, record_id, "line")
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecordError(record_id, "invalid json", str(e)) from e
  if not isinstance(value, dict):
    raise BadRecordError(record_id, "invalid json", f"expected an object, got {type(value).__name__}")
  return value


def decode_image(data: Any, record_id: str, resolution: int, notes: list[str] | None = None) -> np.ndarray:
  """RGB uint8 `[resolution, resolution, 3]` from encoded bytes, a file path or an array.

  Conversions (each noted in `notes` for the pipeline statistics): grayscale / palette / CMYK / RGBA (alpha
  composited on white) / 16-bit -> 8-bit RGB; then the official transform, `image_io.resize_center_crop` (the same
  code as inference's `image_io.preprocess`): torchvision's Resize(resolution, BICUBIC) + CenterCrop(resolution)
  (mmada-official.md §2.6). Unreadable or truncated files are bad records.
  """

  notes = notes if notes is not None else []
  if isinstance(data, np.ndarray):
    image = _array_to_pil(data, record_id, notes)
  else:
    try:
      image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
      image.load()
    except FileNotFoundError as e:
      raise BadRecordError(record_id, "missing image file", str(e)) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
      raise BadRecordError(record_id, "unreadable image", f"{type(e).__name__}: {e}") from e
  image = _to_rgb(image, notes)
  return np.asarray(image_io.resize_center_crop(image, resolution), np.uint8)


def _array_to_pil(data: np.ndarray, record_id: str, notes: list[str]):
  if data.ndim == 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] not in (3, 4)):
    raise BadRecordError(record_id, "unreadable image", f"array of shape {data.shape}")
  if data.dtype != np.uint8:
    notes.append("converted:dtype")
    top = 65535.0 if data.dtype == np.uint16 else (1.0 if np.issubdtype(data.dtype, np.floating) else 255.0)
    data = np.clip(np.round(data.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)
  return Image.fromarray(data)


def _to_rgb(image, notes: list[str]):
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I;16", "I;16B", "I;16L", "I"):
    notes.append("converted:16bit")
    arr = np.asarray(image, np.float64)
    top = 65535.0 if arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)).convert("RGB")
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
    notes.append("converted:alpha")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  notes.append(f"converted:{mode.lower()}")
  return image.convert("RGB")


def gsm8k_parts(answer: str, record_id: str) -> tuple[str, str]:
  """(reasoning, final answer) of a GSM8K answer `"... #### 42"` (commas in the number removed)."""
  if "####" not in answer:
    raise BadRecordError(record_id, "missing gsm8k final answer", "no '####' in answer")
  reasoning, final = answer.rsplit("####", 1)
  final = final.strip().replace(",", "")
  if not final:
    raise BadRecordError(record_id, "missing gsm8k final answer", "empty after '####'")
  return reasoning.strip(), final
