"""Evaluation and sample grids inside training runs (`train.sample_every`).

Every `train.sample_every` steps (and at the end) a ToyWorld training run generates with its current parameters on the
first `train.sample_count` held-out test records — the same protocol as `mmada-jax eval` (`toyworld_eval.evaluate`),
so the figures are comparable — and writes

  WORKDIR/samples/step<N>.json   accuracies per task and kind, example answers, sampler settings
  WORKDIR/samples/step<N>.md     the markdown table
  WORKDIR/samples/step<N>.png    the first generated images (t2i), next to nothing else

while `sample_acc_<task>` values go into the run's metrics. Tasks: `train.sample_tasks` (comma-separated subset of
text, mmu, t2i), or by default those the run trains (`lm` → text, `mmu` → mmu, `t2i` → t2i; image tasks need
`data.image_tokenizer`). Only ToyWorld runs have held-out answers to score: `config.validate()` refuses `sample_every`
for sources other than `toyworld` and `tokens:` directories (which must then have been prepared from ToyWorld).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

from mmada_jax.eval import toyworld_eval
from mmada_jax.inference.image_tokenizer import load_image_tokenizer
from mmada_jax.inference.sampler import Sampler

TASK_OF = {"lm": "text", "mmu": "mmu", "t2i": "t2i"}


def sample_tasks(config) -> tuple[str, ...]:
  """The tasks evaluated during training (see module docstring); errors name the offending keys."""
  t = config.train
  if str(t.get("sample_tasks", "")).strip():
    tasks = tuple(s.strip() for s in str(t.sample_tasks).split(",") if s.strip())
    unknown = [s for s in tasks if s not in toyworld_eval.TASKS]
    if unknown:
      raise ValueError(f"train.sample_tasks: unknown task(s) {unknown} (known: {', '.join(toyworld_eval.TASKS)})")
  else:
    tasks = tuple(TASK_OF[k] for k in ("lm", "mmu", "t2i") if int(config.data[f"batch_size_{k}"]) > 0)
  if not config.data.image_tokenizer and any(s != "text" for s in tasks):
    raise ValueError(f"train.sample_every: the tasks {list(tasks)} need images; set data.image_tokenizer or "
                     "train.sample_tasks=text")
  return tasks


class PeriodicSampler:
  """Callable `(step, params) -> {"sample_acc_<task>": accuracy, ...}`; writes the files of the module docstring."""

  def __init__(self, config, model, workdir: str, log: Callable[[str], None] = print):
    self.config, self.model, self.log = config, model, log
    self.every, self.count = int(config.train.sample_every), int(config.train.sample_count)
    self.tasks = sample_tasks(config)
    self.out_dir = os.path.join(workdir, "samples")
    self.images = (load_image_tokenizer(config, None, log=lambda _: None)
                   if any(t != "text" for t in self.tasks) else None)

  def due(self, step: int, total: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == total)

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    sampler = Sampler.from_parts(self.config, self.model, params, images=self.images,
                                 origin={"source": "training", "step": step})
    options = toyworld_eval.EvalOptions(tasks=self.tasks, count=self.count, batch_size=min(16, self.count),
                                        seed=int(self.config.seed), text_format="auto", chance=False)
    result, grid = toyworld_eval.evaluate(sampler, options, log=lambda _: None)
    scores = {f"sample_acc_{t}": float(a) for t, a in result["accuracy"].items()}
    if jax.process_index() != 0:  # every host generates (one program over the mesh); the first one writes
      return scores
    stem = os.path.join(self.out_dir, f"step{step}")
    toyworld_eval.write_outputs(result, grid, {"json": stem + ".json", "md": stem + ".md", "png": stem + ".png"},
                                f"ToyWorld samples at step {step}")
    self.log(f"step {step} samples: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()) + f" ({stem}.md)")
    return scores
