"""Image pre- and post-processing for the MAGVIT-v2 tokenizer, as the official code does it (spec §2.6).

Input (`image_transform`): RGB -> resize the shorter side to `resolution` (PIL bicubic, which antialiases when
shrinking; the longer side becomes int(resolution * long / short)) -> centre crop resolution x resolution (offsets
int(round((size - crop) / 2)), Python rounding) -> [0, 1] -> (x - 0.5) / 0.5 = [-1, 1].
`image_transform_squash`: resize straight to resolution x resolution (bicubic), no crop.
Output: clamp((x + 1) / 2, 0, 1) * 255 in float32, then truncation to uint8 (not rounding).

Arrays are channels-last: one image [height, width, 3], a batch [batch, height, width, 3].
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

MODES = ("crop", "squash")


def _open(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  if isinstance(image, (str, os.PathLike)):
    if not os.path.exists(image):
      raise FileNotFoundError(f"image not found: {image}")
    with Image.open(image) as im:
      return im.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"expected a PIL image, a path or a uint8 array [height, width, 3], got {arr.dtype}{arr.shape}")
  return Image.fromarray(arr, "RGB")


def resize_shorter_side(im: Image.Image, size: int) -> Image.Image:
  """Shorter side -> `size`, aspect ratio kept (longer side truncated like torchvision's Resize(int))."""
  w, h = im.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  return im.resize((new_w, new_h), Image.BICUBIC)


def center_crop(im: Image.Image, size: int) -> Image.Image:
  """Centre size x size crop; offsets rounded with Python's round() (half to even), as torchvision's CenterCrop."""
  w, h = im.size
  if w < size or h < size:
    raise ValueError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return im.crop((left, top, left + size, top + size))


def preprocess(image, resolution: int, mode: str = "crop") -> np.ndarray:
  """PIL image / path / uint8 array -> float32 [resolution, resolution, 3] in [-1, 1]."""
  if mode not in MODES:
    raise ValueError(f"resize mode must be one of {MODES}, got {mode!r}")
  im = _open(image)
  if mode == "crop":
    im = center_crop(resize_shorter_side(im, resolution), resolution)
  else:
    im = im.resize((resolution, resolution), Image.BICUBIC)
  x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
  return (x - np.float32(0.5)) / np.float32(0.5)


def load_images(images: Iterable, resolution: int, mode: str = "crop") -> np.ndarray:
  """Several images -> float32 [batch, resolution, resolution, 3] in [-1, 1]."""
  out = [preprocess(im, resolution, mode) for im in images]
  if not out:
    raise ValueError("no images given")
  return np.stack(out)


def to_uint8(images) -> np.ndarray:
  """Model output in about [-1, 1] (any shape) -> uint8, official clamp-scale-truncate conversion."""
  x = np.asarray(images, dtype=np.float32)
  x = np.clip((x + np.float32(1.0)) / np.float32(2.0), 0.0, 1.0) * np.float32(255.0)
  return x.astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
  """uint8 [batch, height, width, 3] -> one uint8 picture, `nrow` images per row, `padding` pixels around each."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"make_grid expects uint8 [batch, height, width, channels], got {images.dtype}{images.shape}")
  n, h, w, c = images.shape
  cols = max(1, min(nrow, n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    y, x = padding + r * (h + padding), padding + q * (w + padding)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  """Writes a uint8 [height, width, 3] array as PNG (parent directories created). Returns the path."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"save_png expects uint8 pixels (use to_uint8 first), got {image.dtype}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path, format="PNG")
  return path


def save_grid(images, path: str, nrow: int = 8, padding: int = 2) -> str:
  """Model outputs [batch, height, width, 3] in [-1, 1] (or uint8) -> a PNG grid at `path`."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  return save_png(make_grid(images, nrow=nrow, padding=padding), path)


def side_by_side(originals: Sequence, reconstructions: Sequence) -> np.ndarray:
  """Interleaves originals and reconstructions ([batch, h, w, 3] each, [-1, 1]) for a comparison grid."""
  a, b = to_uint8(originals), to_uint8(reconstructions)
  if a.shape != b.shape:
    raise ValueError(f"originals {a.shape} and reconstructions {b.shape} differ in shape")
  return np.stack([a, b], axis=1).reshape(-1, *a.shape[1:])
