"""Programmatic checkers for ToyWorld: answers to text tasks, and attributes of an image read from its pixels.

Image detection (no learning involved, so it cannot be fooled by a model that learnt the checker):
1. each pixel gets the nearest palette colour if it lies within `COLOUR_TOLERANCE` of it, else no label;
2. connected components (4-neighbourhood) of each colour label;
3. a component is an object only if its bounding box is roughly square, between `MIN_SIDE` and `MAX_SIDE` cells wide,
   and it matches one ideal shape drawn in that box (intersection over union >= `MIN_IOU`); anything else (speckle,
   blobs, whole-image fills) is ignored;
4. its position is the grid cell of its centroid.
A blank image has no objects; uniform noise yields speckle that fails the size/shape tests (measured in the tests and by
`measure_accuracy`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Iterable

import numpy as np
from scipy import ndimage

from mmada_jax.data import toyworld as tw

COLOUR_TOLERANCE = 70.0  # RGB distance to the nearest palette colour; palette colours are >= ~120 apart
MIN_SIDE, MAX_SIDE = 0.4, 1.0  # object bounding-box side in units of a grid cell
MIN_ASPECT = 0.7  # min(w, h) / max(w, h)
MIN_IOU = 0.8  # agreement with the best-matching ideal shape


@dataclasses.dataclass(frozen=True)
class Detection:
  shape: int
  colour: int
  cell: int
  area: int
  bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive)

  def key(self) -> tuple[int, int, int]:
    return self.shape, self.colour, self.cell


def colour_labels(image: np.ndarray) -> np.ndarray:
  """`[H, W]` int: index of the nearest palette colour within tolerance, -1 elsewhere (background included)."""
  img = _as_rgb(image).astype(np.float32)
  dist = np.linalg.norm(img[:, :, None, :] - tw.PALETTE[None, None].astype(np.float32), axis=-1)
  nearest = dist.argmin(-1)
  return np.where(dist.min(-1) <= COLOUR_TOLERANCE, nearest, -1)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"expected a square RGB image [H, W, 3], got shape {image.shape}")
  if np.issubdtype(image.dtype, np.floating):  # [0, 1] floats, as decoders often return
    image = np.clip(np.round(image * 255.0), 0, 255)
  return image


def shape_templates(h: int, w: int) -> np.ndarray:
  """Boolean `[3, h, w]`: each shape of SHAPES rendered (as `toyworld.shape_mask` does) to fill an `h x w` box."""
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  dx, dy = (xs - w / 2) / (w / 2), (ys - h / 2) / (h / 2)  # [-1, 1] over the box
  out = np.zeros((len(tw.SHAPES), h, w), bool)
  out[tw.SHAPES.index("square")] = True
  out[tw.SHAPES.index("circle")] = dx * dx + dy * dy <= 1.0
  t = (dy + 1) / 2  # 0 at the apex row, 1 at the base
  out[tw.SHAPES.index("triangle")] = np.abs(dx) <= t
  return out


def classify_shape(component: np.ndarray) -> int | None:
  """Shape index of a boolean component cropped to its bounding box `[h, w]`, or None if it fits no shape.

  The component is compared with each ideal shape drawn in the same box; the best intersection-over-union wins if it
  reaches `MIN_IOU` (a circle is ~0.79 of a square, so the argmax, not the threshold, separates those two).
  """
  templates = shape_templates(*component.shape)
  inter = (templates & component).sum((1, 2))
  union = (templates | component).sum((1, 2))
  iou = inter / np.maximum(union, 1)
  best = int(iou.argmax())
  return best if iou[best] >= MIN_IOU else None


def detect(image: np.ndarray, grid: int = 3) -> list[Detection]:
  """Objects found in an RGB image `[H, W, 3]` (uint8, or float in [0, 1]) on a `grid x grid` layout, in cell order."""
  labels = colour_labels(image)
  size = labels.shape[0]
  cell = size / grid
  found = []
  for colour in range(len(tw.COLOURS)):
    comp, n = ndimage.label(labels == colour)
    for k, sl in enumerate(ndimage.find_objects(comp), start=1):
      crop = comp[sl] == k
      h, w = crop.shape
      if not (MIN_SIDE * cell <= max(h, w) <= MAX_SIDE * cell + 1 and min(h, w) >= MIN_ASPECT * max(h, w)):
        continue
      shape = classify_shape(crop)
      if shape is None:
        continue
      ys, xs = np.nonzero(crop)
      cy, cx = ys.mean() + sl[0].start + 0.5, xs.mean() + sl[1].start + 0.5
      pos = int(min(cy // cell, grid - 1) * grid + min(cx // cell, grid - 1))
      found.append(Detection(shape, colour, pos, int(crop.sum()), (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
  return sorted(found, key=lambda d: (d.cell, d.colour, d.shape))


# ----------------------------------------------------------------------------------------------------------------------
# Image checks


def check_scene(image: np.ndarray, objects: Iterable[tw.Obj], grid: int = 3) -> bool:
  """True iff the detected objects are exactly `objects` (shape, colour and cell each), nothing more."""
  want = Counter((o.shape, o.colour, o.cell) for o in objects)
  return Counter(d.key() for d in detect(image, grid)) == want


def check_count(image: np.ndarray, count: int, colour: int, shape: int, grid: int = 3) -> bool:
  """True iff the image holds exactly `count` objects, all of the given colour and shape."""
  found = detect(image, grid)
  return len(found) == count and all(d.colour == colour and d.shape == shape for d in found)


def check_draw(image: np.ndarray, record: dict[str, Any]) -> bool:
  """Checks an image against a record's t2i prompt (`draw_kind` describe / count / reason)."""
  grid = int(record["grid"])
  if record["draw_kind"] == "describe":
    return check_scene(image, tw.objects_of(record), grid)
  return check_count(image, int(record["target_count"]), int(record["target_colour"]), int(record["target_shape"]),
                     grid)


def attribute_scores(image: np.ndarray, objects: list[tw.Obj], grid: int = 3) -> dict[str, float]:
  """Per-attribute agreement of the detections with the true objects (each in [0, 1]).

  `count`: number of detections equals number of objects. `position`: true cells with a detection. `colour` / `shape`:
  true objects whose cell has exactly one detection, of the right colour / shape. Each of the last three is divided
  by the larger of the number of objects and the number of detections, so that extra objects cost: otherwise drawing
  more than asked is never worse than drawing too few (found under UniGRPO on ToyWorld: the policy learnt to overdraw).
  """
  found = detect(image, grid)
  by_cell = {}
  for d in found:
    by_cell.setdefault(d.cell, []).append(d)
  matched = [(o, by_cell[o.cell][0]) for o in objects if len(by_cell.get(o.cell, [])) == 1]
  n = max(len(objects), len(found), 1)
  return dict(count=float(len(found) == len(objects)), position=sum(o.cell in by_cell for o in objects) / n,
              colour=sum(o.colour == d.colour for o, d in matched) / n,
              shape=sum(o.shape == d.shape for o, d in matched) / n)


def count_attribute_scores(image: np.ndarray, count: int, colour: int, shape: int, grid: int = 3) -> dict[str, float]:
  """Per-attribute agreement with a "count" / "reason" prompt (`count` objects of one colour and shape, anywhere).

  `count`: number of detections equals `count`. `colour` / `shape`: detections of the asked colour / shape, at most
  `count` of them, over the larger of `count` and the number of detections (extra objects cost, as in
  `attribute_scores`). Positions are not scored: the prompt does not name them. All three are 1 exactly when
  `check_count` passes.
  """
  found = detect(image, grid)
  n = max(count, len(found), 1)
  return dict(count=float(len(found) == count), colour=min(sum(d.colour == colour for d in found), count) / n,
              shape=min(sum(d.shape == shape for d in found), count) / n)


def draw_attribute_scores(image: np.ndarray, record: dict[str, Any]) -> dict[str, float]:
  """Per-attribute agreement of an image with a record's t2i prompt: `attribute_scores` against the described scene
  for "describe" prompts, `count_attribute_scores` for "count" / "reason" prompts (whose scene's positions are one
  random layout of many the prompt allows). All scores are 1 exactly when `check_draw` passes."""
  grid = int(record["grid"])
  if record["draw_kind"] == "describe":
    return attribute_scores(image, tw.objects_of(record), grid)
  return count_attribute_scores(image, int(record["target_count"]), int(record["target_colour"]),
                                int(record["target_shape"]), grid)


# ----------------------------------------------------------------------------------------------------------------------
# Text checks

_NUMBER = re.compile(r"-?\d+")


def normalize_answer(text: str) -> str:
  """Lower case, no punctuation at the ends, single spaces; number words 0-9 become digits."""
  text = " ".join(str(text).lower().strip().strip(".!?,;:").split())
  return str(tw.NUMBER_WORDS.index(text)) if text in tw.NUMBER_WORDS else text


def final_answer(response: str, think_close: str = "</think>") -> str:
  """The part of a response after the last `</think>` (the whole response when there is none)."""
  return response.rsplit(think_close, 1)[-1] if think_close in response else response


def check_answer(response: str, answer: str, require_think: bool = False, think_open: str = "<think>",
                 think_close: str = "</think>") -> bool:
  """Exact match of the normalised final answer. Numeric answers compare the first integer of the final answer.

  `require_think` also demands a `<think>...</think>` block before the answer (format reward).
  """
  if require_think and not (think_open in response and think_close in response.split(think_open, 1)[1]):
    return False
  got, want = normalize_answer(final_answer(response, think_close)), normalize_answer(answer)
  if _NUMBER.fullmatch(want):
    m = _NUMBER.search(got)
    return bool(m) and m.group() == want and len(got) <= len(m.group()) + 1
  return got == want


# ----------------------------------------------------------------------------------------------------------------------
# Measurement


def measure_accuracy(world: tw.ToyWorld, split: str = "test", count: int = 500, kind: str = "truth",
                     seed: int = 0) -> dict[str, float]:
  """Pass rates of the image checkers on `count` records of `split`.

  kind: "truth" (the record's own render), "blank" (all black), "noise" (uniform random RGB) or "shuffled" (the
  render of another record: a wrong but realistic image).
  Returns `draw` (check_draw passes), `scene` (check_scene) and mean per-attribute scores.
  """
  rng = np.random.default_rng(seed)
  totals = Counter()
  for i in range(count):
    record = world.example(split, i)
    image = _probe_image(world, split, i, count, kind, record, rng)
    objects = tw.objects_of(record)
    totals["draw"] += check_draw(image, record)
    totals["scene"] += check_scene(image, objects, world.grid)
    for k, v in attribute_scores(image, objects, world.grid).items():
      totals[k] += v
  return {k: v / count for k, v in totals.items()}


def _probe_image(world, split, i, count, kind, record, rng) -> np.ndarray:
  size = world.image_size
  if kind == "truth":
    return record["image"]
  if kind == "blank":
    return np.zeros((size, size, 3), np.uint8)
  if kind == "noise":
    return rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
  if kind == "shuffled":
    return world.example(split, (i + 1 + int(rng.integers(count))) % (10 * count) + count)["image"]
  raise ValueError(f"unknown probe kind {kind!r}; expected truth, blank, noise or shuffled")
