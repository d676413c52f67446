"""Image pre- and post-processing for the MAGVIT-v2 tokenizer, as the official code does it (spec §2.6).

Input (`image_transform`): RGB -> torchvision `Resize(resolution, interpolation=BICUBIC, antialias=True)` then
`CenterCrop(resolution)` on the PIL image -> [0, 1] -> (x - 0.5) / 0.5 = [-1, 1]. On a PIL image that is:
  * resize: the shorter side becomes `resolution`, the longer side int(resolution * long / short) (truncated, not
    rounded; no max_size), PIL bicubic (which antialiases when shrinking); no resize when the size is already right;
  * crop: top = int(round((height - resolution) / 2)), left = int(round((width - resolution) / 2)) with Python's
    round() (half to even: 0.5 -> 0, 1.5 -> 2).
This module is the one implementation of that transform: `data.sources.decode_image` (training data) uses it too.
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


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(new_width, new_height) of torchvision's Resize(size) (an int, no max_size): the shorter side becomes `size`,
  the longer one int(size * long / short), truncated."""
  if width < 1 or height < 1 or size < 1:
    raise ValueError(f"cannot resize a {width}x{height} image to a shorter side of {size}")
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """PIL crop box (left, top, right, bottom) of torchvision's CenterCrop(size) on a width x height image at least
  size x size: offsets int(round((side - size) / 2)), Python's round (half to even)."""
  if width < size or height < size:
    raise ValueError(f"image of {width}x{height} is smaller than the {size}x{size} crop")
  top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def resize_shorter_side(im: Image.Image, size: int) -> Image.Image:
  """Shorter side -> `size`, aspect ratio kept, bicubic: torchvision's Resize(size, BICUBIC) on a PIL image."""
  new_size = resized_size(*im.size, size)
  return im if new_size == im.size else im.resize(new_size, Image.BICUBIC)


def center_crop(im: Image.Image, size: int) -> Image.Image:
  """Centre size x size crop, torchvision's CenterCrop(size) (see `center_crop_box`)."""
  return im.crop(center_crop_box(*im.size, size))


def resize_center_crop(im: Image.Image, resolution: int) -> Image.Image:
  """The official transform's geometry on an RGB PIL image: Resize(resolution, BICUBIC) then CenterCrop(resolution).
  Returns a resolution x resolution PIL image."""
  return center_crop(resize_shorter_side(im, resolution), resolution)


def preprocess(image, resolution: int, mode: str = "crop") -> np.ndarray:
  """PIL image / path / uint8 array -> float32 [resolution, resolution, 3] in [-1, 1]."""
  if mode not in MODES:
    raise ValueError(f"resize mode must be one of {MODES}, got {mode!r}")
  im = _open(image)
  if mode == "crop":
    im = resize_center_crop(im, resolution)
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
