"""`mmada-jax demo --workdir DIR`: the ToyWorld pipeline end to end on CPU.

  1. image tokenizer: a MAGVIT-v2 trained from scratch on ToyWorld images   -> DIR/magvit (params, state, recon.png)
  2. stage 1 pre-training: t2i + text + image QA                            -> DIR/stage1 (checkpoints, metrics)
  3. Mix-CoT: chat/CoT text + CoT visual QA + t2i, from stage 1            -> DIR/cot

Each step is an ordinary command's work (`magvit_train`, `mmada-jax train`), so rerunning the demo resumes where it
stopped. Every run directory holds metrics.jsonl (train and held-out losses; the learning curves) and TensorBoard event
files. At the end the held-out masked-token loss of each task is printed at initialisation and after training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mmada_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str) -> str:
  """Path of a file in experiments/ (next to the package in a source checkout)."""
  path = os.path.join(ROOT, "experiments", name.split(":")[0])
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"{path} not found: the demo runs from a source checkout of mmada-jax")
  return os.path.join(ROOT, "experiments", name)


def train_tokenizer(workdir: str, steps: int, log) -> str:
  from mmada_jax.models import magvit_train

  out = os.path.join(workdir, "magvit")
  params = os.path.join(out, "params")
  config = config_lib.load_config(experiment("magvit_toyworld.py"), {"magvit.train.steps": str(steps)})
  if os.path.exists(os.path.join(params, "metadata")):
    log(f"[1/3] image tokenizer: {params} exists, reused")
    return params
  log(f"[1/3] training the ToyWorld image tokenizer ({steps} steps) in {out}")
  result = magvit_train.train(config, out, log=log)
  scores = magvit_train.evaluate(config, result["params"], out_png=os.path.join(out, "recon.png"))
  log("      held-out reconstruction: " + json.dumps({k: round(v, 4) for k, v in scores.items()}))
  return params


def train_stage(workdir: str, variant: str, steps: int, overrides: dict, log, progress: bool) -> dict:
  from mmada_jax.diffusion.losses import Objective
  from mmada_jax.train import data_setup, loop

  config = config_lib.load_config(experiment(f"toyworld.py:{variant}"), {"train.steps": str(steps), **overrides})
  run = loop.setup(config, workdir, Objective, data_setup.make_data, log=log)
  loop.train(run, log=log, progress=progress)
  return held_out_curve(workdir)


def held_out_curve(workdir: str) -> dict:
  """{task: (loss at the first evaluation, loss at the last)} from metrics.jsonl."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [r for r in rows if any(k.startswith("eval_loss_") for k in r)]
  tasks = sorted(k[len("eval_loss_"):] for k in evals[-1] if k.startswith("eval_loss_"))
  return {t: (evals[0].get(f"eval_loss_{t}"), evals[-1][f"eval_loss_{t}"]) for t in tasks}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="mmada-jax demo", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--magvit_steps", type=int, default=150)
  p.add_argument("--stage1_steps", type=int, default=100)
  p.add_argument("--cot_steps", type=int, default=40)
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args(argv)
  log = lambda s: print(s, flush=True)
  tokenizer = train_tokenizer(a.workdir, a.magvit_steps, log)
  common = {"data.image_tokenizer": tokenizer}
  stage1 = os.path.join(a.workdir, "stage1")
  log(f"[2/3] stage 1 pre-training ({a.stage1_steps} steps) in {stage1}")
  curves = {"stage1": train_stage(stage1, "stage1", a.stage1_steps, common, log, not a.no_progress)}
  cot = os.path.join(a.workdir, "cot")
  log(f"[3/3] Mix-CoT ({a.cot_steps} steps, from stage 1) in {cot}")
  curves["cot"] = train_stage(cot, "cot", a.cot_steps, {**common, "train.init_from": stage1}, log,
                              not a.no_progress)
  log("held-out masked-token loss per task (first evaluation -> last):")
  for stage, tasks in curves.items():
    for task, (first, last) in tasks.items():
      log(f"  {stage:7s} {task:4s} {first:8.4f} -> {last:8.4f}")
  with open(os.path.join(a.workdir, "summary.json"), "w") as f:
    json.dump(curves, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
