"""`mmada-jax demo --workdir DIR`: the ToyWorld pipeline end to end on CPU, ending with what the model learnt.

  1. image tokenizer: a MAGVIT-v2 trained from scratch on ToyWorld images   -> DIR/magvit (params, state, recon.png)
  2. stage 1 pre-training: t2i + text + image QA                            -> DIR/stage1 (checkpoints, metrics)
  3. Mix-CoT: chat/CoT text + CoT visual QA + t2i, from stage 1            -> DIR/cot
  4. what it learnt: a held-out word problem and visual question answered, held-out prompts drawn and checked
                                                                            -> DIR/showcase.png
  5. UniGRPO: a few policy steps on the word problems, from Mix-CoT         -> DIR/rl (checkpoints, metrics)

Each step is an ordinary command's work (`mmada-jax magvit`, `mmada-jax train`, `mmada-jax rl`), so rerunning the
demo resumes where it stopped. Every run directory holds metrics.jsonl (the learning curves). At the end the
held-out masked-token loss of each task is printed at initialisation and after training, and the UniGRPO reward and
held-out accuracy before and after its steps. The figures are those of a toy model trained for minutes: the point is
the pipeline, not the scores.
"""

from __future__ import annotations

import json
import os

from mmada_jax import config as config_lib
from mmada_jax.cli import common
from mmada_jax.diffusion.losses import Objective
from mmada_jax.eval import showcase
from mmada_jax.inference.sampler import Sampler
from mmada_jax.models import image_io
from mmada_jax.rl import loop as rl_loop
from mmada_jax.train import data_setup, loop, magvit as magvit_train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = 5


def experiment(name: str) -> str:
  """Path of a file in experiments/ (next to the package in a source checkout)."""
  path = os.path.join(ROOT, "experiments", name.split(":")[0])
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"{path} not found: the demo runs from a source checkout of mmada-jax")
  return os.path.join(ROOT, "experiments", name)


def train_tokenizer(workdir: str, steps: int, log) -> str:
  out = os.path.join(workdir, "magvit")
  params = os.path.join(out, "params")
  config = config_lib.load_config(experiment("magvit_toyworld.py"), {"magvit.train.steps": str(steps)})
  if os.path.exists(os.path.join(params, "metadata")):
    log(f"[1/{STAGES}] image tokenizer: {params} exists, reused")
    return params
  log(f"[1/{STAGES}] training the ToyWorld image tokenizer ({steps} steps) in {out}")
  result = magvit_train.train(config, out, log=log)
  scores = magvit_train.evaluate(config, result["params"], out_png=os.path.join(out, "recon.png"))
  log("      held-out reconstruction: " + json.dumps({k: round(v, 4) for k, v in scores.items()}))
  return params


def train_stage(workdir: str, variant: str, steps: int, overrides: dict, log, progress: bool) -> dict:
  config = config_lib.load_config(experiment(f"toyworld.py:{variant}"), {"train.steps": str(steps), **overrides})
  run = loop.setup(config, workdir, Objective, data_setup.make_data, log=log)
  loop.train(run, log=log, progress=progress)
  return held_out_curve(workdir)


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def held_out_curve(workdir: str) -> dict:
  """{task: (loss at the first evaluation, loss at the last)} from metrics.jsonl."""
  evals = [r for r in _metrics(workdir) if any(k.startswith("eval_loss_") for k in r)]
  tasks = sorted(k[len("eval_loss_"):] for k in evals[-1] if k.startswith("eval_loss_"))
  return {t: (evals[0].get(f"eval_loss_{t}"), evals[-1][f"eval_loss_{t}"]) for t in tasks}


def show_what_it_learnt(workdir: str, cot: str, overrides: dict, log) -> dict:
  """Step 4: the Mix-CoT model answers and draws held-out ToyWorld records; the drawings go to DIR/showcase.png."""
  config = config_lib.load_config(experiment("toyworld.py:cot"), overrides)
  sampler = Sampler.load(config, workdir=cot, need_images=True, log=lambda _: None)
  shown = showcase.show(sampler)
  for line in showcase.report(shown):
    log(line)
  path = image_io.save_png(shown.grid, os.path.join(workdir, "showcase.png"))
  log(f"  drawings (green frame: the checker passes the image, red: it does not): {path}")
  return {"text_correct": shown.text.correct, "mmu_correct": shown.mmu.correct,
          "drawings_passed": int(sum(shown.verdicts)), "drawings": len(shown.verdicts)}


def unigrpo(workdir: str, cot: str, steps: int, overrides: dict, log, progress: bool) -> dict:
  """Step 5: a short UniGRPO run on the word problems from the Mix-CoT model; reward and held-out accuracy of its
  first and last steps."""
  config = config_lib.load_config(experiment("toyworld_rl.py:text"), {
      **overrides, "train.init_from": cot, "rl.steps": str(steps), "rl.prompts_per_step": "4",
      "rl.eval_prompts": "32", "rl.eval_every": str(steps), "checkpoint.save_every_steps": str(steps)})
  run = rl_loop.setup(config, workdir, log=log)
  rl_loop.train(run, log=log, progress=progress)
  rows = [r for r in _metrics(workdir) if "reward_total" in r]
  evals = [r for r in _metrics(workdir) if "eval_accuracy" in r]
  return {"reward": (rows[0]["reward_total"], rows[-1]["reward_total"]),
          "eval_accuracy": (evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"])}


def _parser():
  p = common.parser("demo", __doc__, epilog=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--magvit_steps", type=int, default=150)
  p.add_argument("--stage1_steps", type=int, default=100)
  p.add_argument("--cot_steps", type=int, default=40)
  p.add_argument("--rl_steps", type=int, default=4, help="UniGRPO steps after Mix-CoT (0: skip)")
  p.add_argument("--no_progress", action="store_true")
  return p


def main(argv: list[str]) -> int:
  a = _parser().parse_args(argv)
  log = lambda s: print(s, flush=True)
  shared = {"data.image_tokenizer": train_tokenizer(a.workdir, a.magvit_steps, log)}
  stage1, cot = os.path.join(a.workdir, "stage1"), os.path.join(a.workdir, "cot")
  log(f"[2/{STAGES}] stage 1 pre-training ({a.stage1_steps} steps) in {stage1}")
  summary = {"stage1": train_stage(stage1, "stage1", a.stage1_steps, shared, log, not a.no_progress)}
  log(f"[3/{STAGES}] Mix-CoT ({a.cot_steps} steps, from stage 1) in {cot}")
  summary["cot"] = train_stage(cot, "cot", a.cot_steps, {**shared, "train.init_from": stage1}, log,
                               not a.no_progress)
  log("held-out masked-token loss per task (first evaluation -> last):")
  for stage in ("stage1", "cot"):
    for task, (first, last) in summary[stage].items():
      log(f"  {stage:7s} {task:4s} {first:8.4f} -> {last:8.4f}")
  log(f"[4/{STAGES}] what the Mix-CoT model learnt (held-out ToyWorld records):")
  summary["showcase"] = show_what_it_learnt(a.workdir, cot, shared, log)
  if a.rl_steps > 0:
    rl = os.path.join(a.workdir, "rl")
    log(f"[5/{STAGES}] UniGRPO ({a.rl_steps} steps on the word problems, from Mix-CoT) in {rl}")
    summary["unigrpo"] = unigrpo(rl, cot, a.rl_steps, shared, log, not a.no_progress)
    (r0, r1), (e0, e1) = summary["unigrpo"]["reward"], summary["unigrpo"]["eval_accuracy"]
    log(f"  UniGRPO: mean reward {r0:.3f} (first step) -> {r1:.3f} (step {a.rl_steps}); held-out accuracy "
        f"{e0:.3f} -> {e1:.3f}")
  with open(os.path.join(a.workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return 0
