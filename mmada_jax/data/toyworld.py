"""ToyWorld: the built-in procedural multimodal data set (no download), DESIGN.md "The built-in data set".

A scene is 1..`max_objects` coloured shapes (circle / square / triangle in six colours) on a black background, each in
its own cell of a 3x3 grid, so that colour, shape, position and count can all be read back from pixels
(`toyworld_checkers.py`). Every record `example(split, index)` is a pure function of `(seed, split, index)`, so the data
set is random-access (a grain `MapDataset` source needs nothing else) and identical on every host. The `test` split uses
its own fixed seed whatever `config.seed` is: it is the held-out evaluation set.

Each record carries every task of the world:
  t2i   `draw_prompt` -> `image`. Three kinds: "describe" (the canonical caption of a mixed scene), "count"
        ("three yellow circles") and "reason" ("draw as many yellow circles as 2+1", answered by reasoning first).
  mmu   `question` about the image -> short `answer` (count, colour, shape, position, yes/no, caption), with a
        `<think>` reasoning variant in `answer_reasoning`.
  text  an arithmetic word problem `problem` -> `<think>problem_reasoning</think>problem_answer`; `lm_text` is plain
        pre-training prose (scene description + an arithmetic fact).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmada_jax.tokens import text_tokenizer

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
# Well separated in RGB (smallest pairwise distance ~120) so that a nearest-colour rule survives some blur / noise.
PALETTE = np.array([[220, 40, 40], [40, 180, 60], [40, 80, 230], [235, 215, 40], [160, 60, 200], [40, 200, 210]],
                   np.int32)
# Position names per grid size (cells in row-major order). A cell must be >= MIN_CELL pixels for the checker to tell
# the shapes apart (32 px images therefore use the 2x2 grid).
POSITIONS = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"),
}
MIN_CELL = 16
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = {"train": 0, "validation": 1, "test": 2}
TEST_SEED = 20250515  # the held-out test split never depends on config.seed
DRAW_KINDS = ("describe", "count", "reason")
QUESTION_KINDS = ("count_shape", "count_colour", "count_all", "colour_of", "shape_of", "where", "exists", "caption")
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hugo")
# Instruction of the official reasoning-then-image data (parquet/my_dataset.py R2iDataset); ends with a newline.
R2I_SYSTEM_PROMPT = ("You should first think out a more detailed version of the description and then provide the user "
                     "with the image. The detailed description is enclosed within <think> </think> tags, i.e. <think> "
                     "detailed description here </think> image here\n")


@dataclasses.dataclass(frozen=True)
class Obj:
  """One shape: indices into SHAPES / COLOURS / POSITIONS."""

  shape: int
  colour: int
  cell: int

  def phrase(self, article: bool = True) -> str:
    return f"{'a ' if article else ''}{COLOURS[self.colour]} {SHAPES[self.shape]}"


def grid_of(num_cells: int) -> int:
  return {4: 2, 9: 3}[num_cells]


def position_phrase(cell: int, grid: int) -> str:
  name = POSITIONS[grid][cell]
  return "in the center" if name == "center" else f"at the {name}"


def plural(shape: int, n: int) -> str:
  return SHAPES[shape] if n == 1 else SHAPES[shape] + "s"


def caption(objects: list[Obj], grid: int) -> str:
  """Canonical description, objects in grid order: 'a red circle at the top left and a blue square in the center'."""
  parts = [f"{o.phrase()} {position_phrase(o.cell, grid)}" for o in sorted(objects, key=lambda o: o.cell)]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def count_phrase(n: int, colour: int, shape: int) -> str:
  return f"{NUMBER_WORDS[n]} {COLOURS[colour]} {plural(shape, n)}"


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


def cell_box(cell: int, size: int, grid: int) -> tuple[float, float, float]:
  """(x0, y0, side) of a grid cell in pixels."""
  side = size / grid
  return (cell % grid) * side, (cell // grid) * side, side


def shape_mask(shape: int, cx: float, cy: float, side: float, size: int) -> np.ndarray:
  """Boolean `[size, size]` mask of a shape whose bounding box is `side` wide, centred at (cx, cy)."""
  ys, xs = np.mgrid[0:size, 0:size] + 0.5
  dx, dy, h = xs - cx, ys - cy, side / 2
  if SHAPES[shape] == "square":
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if SHAPES[shape] == "circle":
    return dx * dx + dy * dy <= h * h
  # Upward isosceles triangle: apex at the top centre, base at the bottom edge of the box.
  t = (dy + h) / side  # 0 at the apex row, 1 at the base
  return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)


def render(objects: list[Obj], size: int, grid: int, rng: np.random.Generator) -> np.ndarray:
  """RGB uint8 `[size, size, 3]`: each object drawn inside its cell with random size, jitter and colour shade."""
  image = np.zeros((size, size, 3), np.uint8)
  for o in objects:
    x0, y0, cell = cell_box(o.cell, size, grid)
    # Bounding boxes keep > 1 px from the cell border, so same-coloured neighbours never touch (the checker relies on
    # one connected component per object).
    side = min(rng.uniform(0.6, 0.85) * cell, cell - 1.4)
    slack = (cell - side) / 2 - 0.6
    cx = x0 + cell / 2 + rng.uniform(-slack, slack)
    cy = y0 + cell / 2 + rng.uniform(-slack, slack)
    colour = np.clip(PALETTE[o.colour] + rng.integers(-12, 13, 3), 0, 255)
    image[shape_mask(o.shape, cx, cy, side, size)] = colour.astype(np.uint8)
  return image


# ----------------------------------------------------------------------------------------------------------------------
# Scenes and texts


def _random_scene(rng: np.random.Generator, max_objects: int, grid: int) -> list[Obj]:
  n = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(grid * grid, n, replace=False)
  return [Obj(int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS))), int(c)) for c in cells]


def _uniform_scene(rng: np.random.Generator, n: int, colour: int, shape: int, grid: int) -> list[Obj]:
  return [Obj(shape, colour, int(c)) for c in rng.choice(grid * grid, n, replace=False)]


def _split_sum(rng: np.random.Generator, n: int) -> tuple[str, str]:
  """An expression with value n ('2+1', '5-2' or '2*2') and its worked reasoning ('2+1=3')."""
  options = []
  options += [f"{a}+{n - a}" for a in range(1, n)]
  options += [f"{n + b}-{b}" for b in range(1, 4)]
  options += [f"{a}*{n // a}" for a in range(2, n) if n % a == 0]
  expr = options[int(rng.integers(len(options)))]
  return expr, f"{expr}={n}"


def draw_task(rng: np.random.Generator, max_objects: int, grid: int) -> dict[str, Any]:
  """A t2i prompt and a scene that satisfies it."""
  kind = DRAW_KINDS[int(rng.integers(len(DRAW_KINDS)))]
  if kind == "describe":
    objects = _random_scene(rng, max_objects, grid)
    return dict(draw_kind=kind, objects=objects, draw_prompt=caption(objects, grid), draw_reasoning="", target_count=0,
                target_colour=-1, target_shape=-1)
  n = int(rng.integers(2 if kind == "reason" else 1, max_objects + 1))
  colour, shape = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
  objects = _uniform_scene(rng, n, colour, shape, grid)
  if kind == "count":
    prompt, reasoning = count_phrase(n, colour, shape), ""
  else:
    expr, work = _split_sum(rng, n)
    prompt = f"draw as many {COLOURS[colour]} {plural(shape, 2)} as {expr}"
    reasoning = f"{work}, so {count_phrase(n, colour, shape)}"
  return dict(draw_kind=kind, objects=objects, draw_prompt=prompt, draw_reasoning=reasoning, target_count=n,
              target_colour=colour, target_shape=shape)


def _count_reasoning(matches: list[Obj], what: str, grid: int) -> tuple[str, str]:
  n = len(matches)
  if not n:
    return f"there are no {what}", "0"
  where = ", ".join(f"{o.phrase()} {position_phrase(o.cell, grid)}" for o in sorted(matches, key=lambda o: o.cell))
  return f"{where}; that is {n} {what}" if n > 1 else f"{where}; that is 1", str(n)


def question_task(rng: np.random.Generator, objects: list[Obj], grid: int) -> dict[str, str]:
  """A visual question about `objects` with its short answer and a reasoning for the CoT format."""
  shapes = [o.shape for o in objects]
  colours = [o.colour for o in objects]
  kinds = ["count_shape", "count_colour", "count_all", "exists", "caption"]
  kinds += ["colour_of"] * any(shapes.count(s) == 1 for s in shapes)
  kinds += ["shape_of"] * any(colours.count(c) == 1 for c in colours)
  kinds += ["where"] * any(sum(p == (o.shape, o.colour) for p in zip(shapes, colours)) == 1 for o in objects)
  kind = kinds[int(rng.integers(len(kinds)))]
  listing = caption(objects, grid)
  if kind == "count_shape":
    s = int(rng.integers(len(SHAPES)))
    q = f"How many {plural(s, 2)} are there?"
    why, a = _count_reasoning([o for o in objects if o.shape == s], plural(s, 2), grid)
  elif kind == "count_colour":
    c = int(rng.integers(len(COLOURS)))
    q = f"How many {COLOURS[c]} objects are there?"
    why, a = _count_reasoning([o for o in objects if o.colour == c], f"{COLOURS[c]} objects", grid)
  elif kind == "count_all":
    q, (why, a) = "How many objects are there?", _count_reasoning(objects, "objects", grid)
  elif kind == "exists":
    o = objects[int(rng.integers(len(objects)))] if rng.random() < 0.5 else None
    s, c = (o.shape, o.colour) if o else (int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS))))
    q = f"Is there a {COLOURS[c]} {SHAPES[s]}?"
    a = "yes" if (s, c) in zip(shapes, colours) else "no"
    why = f"I see {listing}"
  elif kind == "caption":
    q, a, why = "Describe the image.", listing, "I look at each cell of the grid"
  else:
    q, a, why = _attribute_question(rng, kind, objects, listing, grid)
  return dict(question_kind=kind, question=q, answer=a, answer_reasoning=why, caption=listing)


def _attribute_question(rng, kind: str, objects: list[Obj], listing: str, grid: int) -> tuple[str, str, str]:
  shapes = [o.shape for o in objects]
  colours = [o.colour for o in objects]
  if kind == "colour_of":
    o = [o for o in objects if shapes.count(o.shape) == 1][int(rng.integers(sum(shapes.count(s) == 1 for s in shapes)))]
    return f"What colour is the {SHAPES[o.shape]}?", COLOURS[o.colour], f"I see {listing}"
  if kind == "shape_of":
    pool = [o for o in objects if colours.count(o.colour) == 1]
    o = pool[int(rng.integers(len(pool)))]
    return f"What shape is the {COLOURS[o.colour]} object?", SHAPES[o.shape], f"I see {listing}"
  pool = [o for o in objects if sum(p == (o.shape, o.colour) for p in zip(shapes, colours)) == 1]
  o = pool[int(rng.integers(len(pool)))]
  return f"Where is the {COLOURS[o.colour]} {SHAPES[o.shape]}?", POSITIONS[grid][o.cell], f"I see {listing}"


def problem_task(rng: np.random.Generator) -> dict[str, str]:
  """An arithmetic word problem with its worked reasoning and integer answer."""
  name = NAMES[int(rng.integers(len(NAMES)))]
  colour, shape = COLOURS[int(rng.integers(len(COLOURS)))], plural(int(rng.integers(len(SHAPES))), 2)
  op = int(rng.integers(3))
  if op == 0:
    a, b = int(rng.integers(2, 21)), int(rng.integers(1, 21))
    text = f"{name} has {a} {colour} {shape} and gets {b} more. How many {colour} {shape} does {name} have now?"
    work, ans = f"{a}+{b}={a + b}", a + b
  elif op == 1:
    a = int(rng.integers(2, 21))
    b = int(rng.integers(1, a))
    text = f"{name} has {a} {colour} {shape} and gives {b} away. How many {colour} {shape} are left?"
    work, ans = f"{a}-{b}={a - b}", a - b
  else:
    a, b = (int(x) for x in rng.integers(2, 10, 2))
    text = f"{name} has {a} boxes with {b} {colour} {shape} in each box. How many {colour} {shape} are there?"
    work, ans = f"{a}*{b}={a * b}", a * b
  fact = work.replace("+", " plus ").replace("-", " minus ").replace("*", " times ").replace("=", " is ")
  return dict(problem=text, problem_reasoning=work, problem_answer=str(ans), fact=fact)


# ----------------------------------------------------------------------------------------------------------------------
# The data set


@dataclasses.dataclass(frozen=True)
class ToyWorld:
  """Random-access generator: `example(split, index)` depends only on (seed, split, index) and the sizes.

  Attributes:
    image_size: pixels per side.
    grid: cells per side of the position grid (2 or 3); `image_size / grid` must be >= MIN_CELL pixels.
    max_objects: at most this many shapes per image (<= grid * grid).
    seed: seed of the train / validation splits (the test split has its own fixed seed).
  """

  image_size: int = 64
  grid: int = 3
  max_objects: int = 4
  seed: int = 0

  def __post_init__(self):
    if self.grid not in POSITIONS:
      raise ValueError(f"toyworld.grid must be one of {sorted(POSITIONS)}, got {self.grid}")
    if self.image_size / self.grid < MIN_CELL:
      raise ValueError(f"toyworld.image_size={self.image_size} gives {self.image_size / self.grid:.1f}-pixel cells "
                       f"with grid={self.grid}; shapes need >= {MIN_CELL}-pixel cells to be told apart "
                       f"(use grid=2 below 48 px)")
    if not 1 <= self.max_objects <= self.grid ** 2:
      raise ValueError(f"toyworld.max_objects must be in [1, {self.grid ** 2}] for grid={self.grid}, got "
                       f"{self.max_objects}")

  @classmethod
  def from_config(cls, config) -> "ToyWorld":
    t = config.data.toyworld
    return cls(image_size=int(t.image_size), grid=int(t.grid), max_objects=int(t.max_objects), seed=int(config.seed))

  def rng(self, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
      raise ValueError(f"unknown ToyWorld split {split!r}; expected one of {sorted(SPLITS)}")
    if index < 0:
      raise IndexError(f"ToyWorld index must be >= 0, got {index}")
    seed = TEST_SEED if split == "test" else self.seed
    return np.random.default_rng([seed, SPLITS[split], int(index), self.image_size, self.grid, self.max_objects])

  def example(self, split: str, index: int, render_image: bool = True) -> dict[str, Any]:
    """One record: the image `[H, W, 3]` uint8, its objects `[max_objects, 3]` int32 (shape, colour, cell; -1 padded)
    and all task texts (see the module docstring)."""
    rng = self.rng(split, index)
    draw = draw_task(rng, self.max_objects, self.grid)
    objects = draw.pop("objects")
    record = dict(draw, **question_task(rng, objects, self.grid), **problem_task(rng))
    record["lm_text"] = f"There is {record['caption']}. {record.pop('fact')}."
    table = np.full((self.max_objects, 3), -1, np.int32)
    table[:len(objects)] = [(o.shape, o.colour, o.cell) for o in objects]
    record.update(objects=table, num_objects=len(objects), grid=self.grid, id=f"toyworld/{split}/{index}")
    record["image"] = render(objects, self.image_size, self.grid, rng) if render_image else None
    return record


def objects_of(record: dict[str, Any]) -> list[Obj]:
  """The `Obj` list stored in a record's `objects` table."""
  return [Obj(int(s), int(c), int(p)) for s, c, p in np.asarray(record["objects"]) if s >= 0]


# ----------------------------------------------------------------------------------------------------------------------
# Task texts (formats of mmada-official.md §3.4-3.7) and the ToyWorld tokenizer


# Between `</think>` and a CoT visual answer. With the ToyWorld BPE a word glued to `</think>` splits into rare pieces
# (`t`+`riangle`, `c`+`ircle`, where `t` also starts `top`), while ` triangle` is the one token the reasoning uses for
# it: the answer is then copied from the reasoning token for token. The checkers strip whitespace.
MMU_ANSWER_SEPARATOR = " "


def mmu_task_text(record: dict[str, Any], vocab, cot: bool = False, literal_eot: bool = True,
                  separator: str = MMU_ANSWER_SEPARATOR) -> str:
  """Question + answer of a record in the official mmu training format; `cot` adds the CoT instruction and answers
  `<think>reasoning</think>{separator}answer`."""
  answer = record["answer"]
  if cot:
    answer = text_tokenizer.cot_answer(record["answer_reasoning"], separator + answer, vocab)
  return text_tokenizer.mmu_text(record["question"], answer, vocab, literal_eot=literal_eot, cot=cot)


def chat_problem_text(record: dict[str, Any], vocab) -> str:
  """The arithmetic word problem as a CoT chat: the user turn carries the CoT instruction, the assistant answers
  `<think>reasoning</think>answer`."""
  answer = text_tokenizer.cot_answer(record["problem_reasoning"], record["problem_answer"], vocab)
  return text_tokenizer.chat_text([{"role": "user", "content": text_tokenizer.COT_SYSTEM_PROMPT + record["problem"]},
                                   {"role": "assistant", "content": answer}], vocab)


def r2i_task_text(record: dict[str, Any], vocab, literal_eot: bool = True) -> str:
  """Text part of the reasoning-then-image layout (official R2iDataset format): the drawing request, then the
  assistant's `<think>...</think>` (for 'reason' prompts the arithmetic, otherwise the prompt restated)."""
  eot = text_tokenizer.LITERAL_EOT if literal_eot else vocab.eot_token
  reasoning = record["draw_reasoning"] or record["draw_prompt"]
  return (f"{vocab.start_header_token}user{vocab.end_header_token}\n{R2I_SYSTEM_PROMPT}{record['draw_prompt']}{eot}"
          f"{vocab.start_header_token}assistant{vocab.end_header_token}\n{vocab.think_open}{reasoning}"
          f"{vocab.think_close}")


def tokenizer_corpus(world: ToyWorld, vocab, num_records: int = 2000) -> list[str]:
  """Texts the ToyWorld tokenizer is trained on: every task text of the first `num_records` train records, in every
  format the pipelines produce."""
  out = []
  for i in range(num_records):
    r = world.example("train", i, render_image=False)
    # The CoT visual answers keep the `</think>answer` join they had when the tokenizer was first trained: any change
    # to this corpus retrains the BPE differently and invalidates every ToyWorld checkpoint and prepared token set.
    mmu = mmu_task_text(r, vocab, cot=bool(i % 2), literal_eot=bool(i % 3), separator="")
    out += [r["draw_prompt"], r["lm_text"], mmu,
            chat_problem_text(r, vocab), r2i_task_text(r, vocab)]
  return out


def toy_tokenizer(vocab, world: ToyWorld | None = None, num_records: int = 2000) -> text_tokenizer.TextTokenizer:
  """The byte-level BPE tokenizer of ToyWorld, laid out on the ids of `vocab` (deterministic)."""
  world = world or ToyWorld()
  return text_tokenizer.train_toy_tokenizer(tokenizer_corpus(world, vocab, num_records), vocab)


class ToyWorldSource:
  """Random-access grain source over `count` generated records of one split (no files involved)."""

  def __init__(self, world: ToyWorld, split: str, count: int):
    world.rng(split, 0)  # validates the split name
    self.world, self.split, self.count = world, split, int(count)

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.count:
      raise IndexError(f"ToyWorld {self.split} index {index} outside [0, {self.count})")
    return self.world.example(self.split, index)

  def __repr__(self) -> str:
    return f"ToyWorldSource({self.split}, {self.count}, {self.world})"
