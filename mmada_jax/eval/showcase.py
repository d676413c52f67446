"""What a ToyWorld model has learnt, shown rather than scored: its answer to a held-out word problem, its answer to a
held-out visual question, and a grid of images drawn for held-out prompts, each framed in the colour of the ToyWorld
checker's verdict (green: the image shows what the prompt asks, red: it does not). `mmada-jax demo` ends with it."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from mmada_jax.data import toyworld as tw, toyworld_checkers as checkers
from mmada_jax.eval import toyworld_eval as te
from mmada_jax.inference import presets
from mmada_jax.inference.sampler import Sampler
from mmada_jax.models import image_io

PASS, FAIL = (40, 170, 60), (200, 40, 40)  # frame colours (uint8 RGB)


@dataclasses.dataclass
class Answer:
  question: str
  answer: str
  reference: str
  correct: bool


@dataclasses.dataclass
class Showcase:
  text: Answer
  mmu: Answer | None
  prompts: list[str]
  verdicts: list[bool]
  grid: np.ndarray | None  # uint8 [H, W, 3]: the drawings, framed by verdict


def framed(images: np.ndarray, verdicts: Sequence[bool], width: int = 3) -> np.ndarray:
  """uint8 images [B, H, W, 3] -> [B, H + 2w, W + 2w, 3], each inside a frame of PASS or FAIL colour."""
  b, h, w, _ = images.shape
  out = np.empty((b, h + 2 * width, w + 2 * width, 3), np.uint8)
  out[:] = np.asarray([PASS if v else FAIL for v in verdicts], np.uint8)[:, None, None, :]
  out[:, width:width + h, width:width + w] = images
  return out


def show(sampler: Sampler, *, index: int = 0, num_drawings: int = 8, seed: int = 0) -> Showcase:
  """Answers test record `index`'s word problem and visual question, and draws the prompts of the `num_drawings` test
  records from `index` on (visual question and drawings only when the sampler has its image tokenizer)."""
  config = sampler.config
  world = tw.ToyWorld.from_config(config)
  key = jax.random.key(seed)
  record = world.example("test", index)
  text_s = presets.text_settings(config)
  prompt, _ = te.text_prompt(sampler, record, te.text_format(config))
  answer = sampler.answer(sampler.generate_text([prompt], te.reasoning_settings(config, text_s), key)[0])
  text = Answer(record["problem"], answer, record["problem_answer"],
                bool(checkers.check_answer(answer, record["problem_answer"])))
  if sampler.images is None:
    return Showcase(text, None, [], [], None)
  codes = sampler.images.encode([record["image"]])[0]
  ids = sampler.mmu_prompt(codes, record["question"], think=te.mmu_cot(config))
  answer = sampler.answer(sampler.generate_text([ids], text_s, jax.random.fold_in(key, 1))[0])
  mmu = Answer(record["question"], answer, record["answer"], bool(checkers.check_answer(answer, record["answer"])))
  records = [world.example("test", index + i) for i in range(num_drawings)]
  prompts = [r["draw_prompt"] for r in records]
  _, images = sampler.generate_images(prompts, presets.image_settings(config), jax.random.fold_in(key, 2))
  verdicts = [bool(checkers.check_draw(image, r)) for image, r in zip(images, records)]
  grid = image_io.make_grid(framed(images, verdicts), nrow=min(8, num_drawings))
  return Showcase(text, mmu, prompts, verdicts, grid)


def report(showcase: Showcase) -> list[str]:
  """The showcase as lines of text (the grid is saved separately)."""
  mark = lambda ok: "correct" if ok else "wrong"
  t = showcase.text
  lines = [f"  word problem:    {t.question}", f"  model's answer:  {t.answer!r} (reference {t.reference}: "
           f"{mark(t.correct)})"]
  if showcase.mmu is not None:
    m = showcase.mmu
    lines += [f"  visual question: {m.question}", f"  model's answer:  {m.answer!r} (reference {m.reference}: "
              f"{mark(m.correct)})"]
  for i, (p, ok) in enumerate(zip(showcase.prompts, showcase.verdicts)):
    lines.append(f"  drawing {i} ({'pass' if ok else 'fail'}): {p}")
  return lines
