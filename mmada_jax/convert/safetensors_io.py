"""Streaming safetensors reader and writer (no torch; bfloat16 through ml_dtypes).

A safetensors file is an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` (plus
an optional `__metadata__` string map), padded with spaces to 8 bytes, then the raw little-endian tensor bytes.
Reading loads one tensor per call (a plain read into a fresh buffer, nothing kept), and writing takes a callable per
tensor, so a conversion only ever holds the tensor it is working on besides its output.

Hugging Face checkpoints are a directory with `config.json` and either one `*.safetensors` file or several plus
`model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {name: file}}`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsError(ValueError):
  """A safetensors file or checkpoint directory is malformed."""


def dtype_name(dtype) -> str:
  d = np.dtype(dtype)
  if d not in _NAMES:
    raise SafetensorsError(f"dtype {d} cannot be stored in safetensors (supported: {sorted(_DTYPES)})")
  return _NAMES[d]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  dtype: str  # safetensors name, e.g. "BF16"
  shape: tuple[int, ...]
  start: int  # byte offsets inside the data section
  end: int

  @property
  def np_dtype(self) -> np.dtype:
    return _DTYPES[self.dtype]


class SafetensorsFile:
  """One `.safetensors` file; `get(name)` reads one tensor into a new array."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{path}: truncated file ({size} bytes), no header")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
      raw = f.read(n)
    try:
      header = json.loads(raw)
    except json.JSONDecodeError as e:
      raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    self.metadata: dict[str, str] | None = header.pop("__metadata__", None)
    self.header_bytes = raw
    self.data_start = 8 + n
    self.tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
      if info.get("dtype") not in _DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
      start, end = info["data_offsets"]
      t = TensorInfo(name, info["dtype"], tuple(info["shape"]), start, end)
      expected = int(np.prod(t.shape, dtype=np.int64)) * t.np_dtype.itemsize
      if end - start != expected:
        raise SafetensorsError(f"{path}: tensor {name!r} has {end - start} bytes, its shape {list(t.shape)} "
                               f"and dtype {t.dtype} need {expected}")
      if self.data_start + end > size:
        raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {self.data_start + end}, beyond the file size "
                               f"{size} (truncated file?)")
      self.tensors[name] = t

  def order(self) -> list[str]:
    """Tensor names in the order their bytes appear in the file."""
    return sorted(self.tensors, key=lambda k: self.tensors[k].start)

  def get(self, name: str) -> np.ndarray:
    t = self.tensors[name]
    raw = np.fromfile(self.path, dtype=np.uint8, count=t.end - t.start, offset=self.data_start + t.start)
    if raw.size != t.end - t.start:
      raise SafetensorsError(f"{self.path}: could not read tensor {name!r} (file changed or truncated)")
    return raw.view(t.np_dtype).reshape(t.shape)


class CheckpointDir:
  """A Hugging Face checkpoint directory: one or several safetensors files (with or without an index)."""

  def __init__(self, path: str):
    if not os.path.isdir(path):
      raise SafetensorsError(f"checkpoint directory not found: {path}")
    self.path = path
    index_path = os.path.join(path, INDEX_NAME)
    self.index_metadata = None
    if os.path.exists(index_path):
      with open(index_path) as f:
        index = json.load(f)
      self.index_metadata = index.get("metadata")
      weight_map = index["weight_map"]
      names = sorted(set(weight_map.values()))
      missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
      if missing:
        raise SafetensorsError(f"{index_path} names files that do not exist: {missing}")
    else:
      names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
      if not names:
        raise SafetensorsError(f"{path}: no *.safetensors files (and no {INDEX_NAME})")
      weight_map = None
    self.files = {n: SafetensorsFile(os.path.join(path, n)) for n in names}
    self.location: dict[str, str] = {}
    for fname, f in self.files.items():
      for key in f.tensors:
        if key in self.location:
          raise SafetensorsError(f"{path}: tensor {key!r} appears in both {self.location[key]} and {fname}")
        self.location[key] = fname
    if weight_map is not None:
      for key, fname in weight_map.items():
        if self.location.get(key) != fname:
          raise SafetensorsError(f"{index_path}: says {key!r} is in {fname}, but it is in "
                                 f"{self.location.get(key, 'no file')}")

  def keys(self) -> list[str]:
    return list(self.location)

  def info(self, key: str) -> TensorInfo:
    return self.files[self.location[key]].tensors[key]

  def get(self, key: str) -> np.ndarray:
    return self.files[self.location[key]].get(key)

  def layout(self) -> dict:
    """File split, tensor order and metadata: what is needed to write the same bytes back."""
    return {
        "files": {n: {"order": f.order(), "metadata": f.metadata} for n, f in self.files.items()},
        "index_metadata": self.index_metadata,
        "has_index": os.path.exists(os.path.join(self.path, INDEX_NAME)),
    }

  def config(self) -> dict | None:
    p = os.path.join(self.path, "config.json")
    if not os.path.exists(p):
      return None
    with open(p) as f:
      return json.load(f)


def canonical_order(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> list[str]:
  """The order the reference safetensors library writes: larger dtype first, then by name."""
  return sorted(specs, key=lambda k: (-np.dtype(specs[k][1]).itemsize, k))


def write_file(path: str, order: Iterable[str], specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
  """Writes one safetensors file, calling `produce(name)` once per tensor in `order`. Returns bytes written.

  The file is written to `path + '.tmp'` and renamed at the end, so an interrupted write never leaves a file that looks
  complete.
  """
  order = list(order)
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  for name in order:
    shape, dtype = specs[name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in order:
      shape, dtype = specs[name]
      arr = np.asarray(produce(name))
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise SafetensorsError(f"{name}: produced {arr.dtype}{list(arr.shape)}, header says "
                               f"{np.dtype(dtype)}{list(shape)}")
      # Native little-endian arrays are written without a copy; a transposed view costs one contiguous copy.
      f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
      del arr
  os.replace(tmp, path)
  return 8 + len(raw) + offset
